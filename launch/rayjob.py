"""A KubeRay RayJob manifest for a recipe, sized from its plan (launch/plan.py), and its offline
validation against the RayJob CRD's own schema.

The manifest: the head pod runs the driver only (`num-cpus: "0"`, sized for the plan's driver
processes); one worker group of identical pods, as many and as large as the plan's `worker_pods`;
requests equal limits (Ray reads its CPUs, GPUs and memory from the limits); a ReadWriteMany volume
on every pod holds the runs (PRUNERL_RUN_ROOT: artifacts, checkpoints and the `file` weight sync
must be visible to every pod) and the Hugging Face cache; KubeRay manages a token for Ray's token
authentication. The entrypoint is what `prunerl submit` runs, from the repository's folder in the
image, which launch/kuberay/Dockerfile builds.

Validation (`manifest_problems`): the `openAPIV3Schema` of the CRD's v1 version, shipped in
launch/kuberay/rayjob-crd-v1.schema.json, with unknown fields rejected as `kubectl apply
--validate=strict` does (the schema alone would let the API server drop them silently), plus
KubeRay's own rule for the name (a DNS-1035 label of at most 47 characters). The CRD's few CEL
rules (deletion strategy, managedBy) concern fields this manifest does not set.
"""
from __future__ import annotations

import functools
import json
import re
import shlex
import textwrap
from pathlib import Path

import yaml

SCHEMA_FILE = Path(__file__).parent / "kuberay" / "rayjob-crd-v1.schema.json"
KUBERAY_VERSION = "v1.7.0"  # the release whose CRD the schema file was taken from
API_VERSION, KIND = "ray.io/v1", "RayJob"
MAX_NAME_LENGTH = 47  # KubeRay: MaxRayClusterNameLength (53) - 6
DEFAULT_IMAGE = "prunerl:latest"
WORKDIR = "/home/ray/prunerl"  # the repository in the image (launch/kuberay/Dockerfile)
DEFAULT_PVC = "prunerl-shared"
SHARED_MOUNT = "/mnt/prunerl"
DEFAULT_HEAD_MEMORY_GIB = 8
GCS_PORT, DASHBOARD_PORT, CLIENT_PORT = 6379, 8265, 10001
FINISHED_TTL_S = 600  # the cluster's pods stay this long after the job, for `kubectl logs`


def job_name(recipe_name: str) -> str:
    """`prunerl-<recipe name>` as a DNS-1035 label of at most MAX_NAME_LENGTH characters."""
    label = re.sub(r"[^a-z0-9-]+", "-", f"prunerl-{recipe_name}".lower())
    return re.sub(r"-+", "-", label)[:MAX_NAME_LENGTH].rstrip("-")


def entrypoint(recipe_path: str, overrides: list[str], workdir: str) -> str:
    """The job's shell command: `prunerl submit`'s entrypoint, run from the repository."""
    from launch.cli import run_command

    return f"cd {shlex.quote(workdir)} && {run_command(recipe_path, overrides)}"


def _container(name: str, image: str, cpus: int, gpus: int, memory_gib: int, mounts: list[dict],
               env: list[dict], ports: list[dict] | None = None) -> dict:
    limits = {"cpu": str(cpus), "memory": f"{memory_gib}Gi", **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    return {"name": name, "image": image, **({"ports": ports} if ports else {}), "env": env,
            "resources": {"requests": dict(limits), "limits": limits}, "volumeMounts": mounts}


def _pod(container: dict, volumes: list[dict]) -> dict:
    return {"spec": {"containers": [container], "volumes": volumes}}


def rayjob_manifest(plan: dict, recipe_path: str, overrides: list[str], *, image: str = DEFAULT_IMAGE,
                    namespace: str = "default", name: str | None = None, pvc: str = DEFAULT_PVC,
                    workdir: str = WORKDIR, head_cpus: int | None = None,
                    head_memory_gib: int = DEFAULT_HEAD_MEMORY_GIB, pod_memory_gib: int | None = None) -> dict:
    import ray

    pods = plan["worker_pods"]
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]  # /dev/shm: Ray's object store, vLLM, NCCL
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    env = []
    if pvc:
        volumes.append({"name": "shared", "persistentVolumeClaim": {"claimName": pvc}})
        mounts.append({"name": "shared", "mountPath": SHARED_MOUNT})
        env = [{"name": "PRUNERL_RUN_ROOT", "value": f"{SHARED_MOUNT}/runs"},
               {"name": "HF_HOME", "value": f"{SHARED_MOUNT}/huggingface"}]
    ports = [{"containerPort": GCS_PORT, "name": "gcs-server"}, {"containerPort": DASHBOARD_PORT, "name": "dashboard"},
             {"containerPort": CLIENT_PORT, "name": "client"}]
    head = _container("ray-head", image, head_cpus or max(2, plan["driver_processes"]), 0, head_memory_gib, mounts,
                      env, ports)
    cluster = {"rayVersion": ray.__version__, "authOptions": {"mode": "token"},
               "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": _pod(head, volumes)}}
    if pods["replicas"]:
        memory_gib = pod_memory_gib or pods["memory_bytes"] // 2**30
        worker = _container("ray-worker", image, pods["cpus"], pods["gpus"], memory_gib, mounts, env)
        cluster["workerGroupSpecs"] = [{"groupName": "workers", "replicas": pods["replicas"],
                                        "minReplicas": pods["replicas"], "maxReplicas": pods["replicas"],
                                        "rayStartParams": {}, "template": _pod(worker, volumes)}]
    return {"apiVersion": API_VERSION, "kind": KIND,
            "metadata": {"name": name or job_name(plan["recipe"]), "namespace": namespace},
            "spec": {"entrypoint": entrypoint(recipe_path, overrides, workdir),
                     "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": FINISHED_TTL_S,
                     "rayClusterSpec": cluster}}


# ---------------------------------------------------------------- validation

def _strict(node):
    """The schema with unknown fields rejected wherever it lists the fields (kubectl's strict mode)."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    strict = {k: (v if k in ("required", "enum", "default") else
                  {p: _strict(s) for p, s in v.items()} if k == "properties" else _strict(v)) for k, v in node.items()}
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        strict["additionalProperties"] = False
    return strict


@functools.lru_cache(maxsize=1)
def _validator():
    from jsonschema import Draft4Validator  # OpenAPI 3.0's schema objects follow JSON Schema draft 4

    schema = _strict(json.loads(SCHEMA_FILE.read_text()))
    Draft4Validator.check_schema(schema)
    return Draft4Validator(schema)


def manifest_problems(manifest: dict) -> list[str]:
    """One line per problem, `field.path: message`; empty when the RayJob is valid."""
    problems = []
    if manifest.get("apiVersion") != API_VERSION or manifest.get("kind") != KIND:
        problems.append(f"apiVersion/kind: must be {API_VERSION} / {KIND}, not "
                        f"{manifest.get('apiVersion')} / {manifest.get('kind')}")
    name = (manifest.get("metadata") or {}).get("name")
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH or not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        problems.append(f"metadata.name: {name!r} must be a DNS-1035 label (lowercase letters, digits, '-'; a "
                        f"letter first) of at most {MAX_NAME_LENGTH} characters (KubeRay)")
    for error in sorted(_validator().iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(map(str, error.absolute_path)) or "(top level)"
        problems.append(f"{where}: {error.message}")
    return problems


# ---------------------------------------------------------------- YAML

def rayjob_yaml(manifest: dict, plan: dict, recipe_path: str) -> str:
    """The manifest with a header saying where each number comes from."""
    pods = plan["worker_pods"]
    cluster = manifest["spec"]["rayClusterSpec"]
    workers = cluster.get("workerGroupSpecs", [])
    worker_memory = workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] if workers else "-"
    peak = plan["peak"]
    header = [
        f"RayJob for recipe '{plan['recipe']}' ({recipe_path}) by `prunerl plan --rayjob`, validated against the "
        f"RayJob CRD schema of KubeRay {KUBERAY_VERSION} (launch/kuberay/).",
        f"Workers: {pods['replicas']} pod(s) of {pods['cpus']} CPU" + (f", {pods['gpus']} GPU" if pods["gpus"] else "")
        + f", {worker_memory} memory: each fits the largest placement bundle; together they hold the peak "
          f"({', '.join(f'{peak[k]:g} {k}' for k in ('CPU', 'GPU') if peak[k])}) of the stages that can run side by "
          f"side; memory: {pods['memory_basis']}.",
        f"Head: the driver only (num-cpus 0; {plan['driver_processes']} driver/reward processes).",
        f"Image: prunerl installed in {WORKDIR} (launch/kuberay/Dockerfile); PRUNERL_RUN_ROOT and HF_HOME on the "
        f"shared volume (a ReadWriteMany PVC) so every pod sees the runs and the model cache.",
        "Apply: kubectl apply -f <this file>; follow: kubectl logs -f job/<metadata.name> (the submitter).",
    ]
    wrapped = [part for line in header for part in textwrap.wrap(line, 98)]
    return "".join(f"# {line}\n" for line in wrapped) + yaml.dump(manifest, Dumper=_PlainDumper, sort_keys=False,
                                                                  width=120)


class _PlainDumper(yaml.SafeDumper):
    """Repeats shared lists (env, volumes) in full: no YAML anchors for a reader to resolve."""

    def ignore_aliases(self, data) -> bool:
        return True
