"""Cluster templates: `prunerl plan`, the KubeRay RayJob manifest (validated against the RayJob
CRD schema) and the SLURM sbatch script (run here with SLURM's tools faked: its real `ray start`,
a real recipe on that Ray, Ray stopped after). The plan's bundles are compared with what the run
reserved from Ray (`<stage>/placement.json`).

The CLI cases call `launch.cli.main` in-process; the sbatch case runs the script with bash.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import REPO, TINY_POLICY
from launch.cli import EXIT_BAD_RECIPE, main, resolve
from launch.memory import GIB
from launch.plan import build_plan, pack
from launch.rayjob import manifest_problems, rayjob_manifest

TINY_RL = str(REPO / "tests" / "recipes" / "tiny_rl.yaml")
TEMPLATE = REPO / "launch" / "kuberay" / "rayjob.yaml"
SBATCH = REPO / "launch" / "slurm" / "prunerl.sbatch"


@pytest.fixture(autouse=True)
def in_the_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name their files relative to the repository


def plan_of(recipe: str, *overrides: str) -> dict:
    return build_plan(resolve(recipe, list(overrides)))


def recipe_file(tmp_path: Path, stages: list[dict], name: str = "recipe.yaml") -> str:
    tree = yaml.safe_load(Path(TINY_RL).read_text())
    tree["stages"] = stages
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return str(path)


# ---------------------------------------------------------------- the plan

def test_parameters_are_counted_exactly_without_loading_weights():
    from transformers import AutoModelForCausalLM

    for folder in (TINY_POLICY, REPO / "recipes" / "assets" / "tiny-qwen2-think"):
        loaded = AutoModelForCausalLM.from_pretrained(folder)
        plan = plan_of(TINY_RL, f"model.path={folder}")
        assert plan["model"]["parameters"] == sum(p.numel() for p in loaded.parameters())


def test_side_by_side_sets_peak_minimum_and_pods(tmp_path):
    prune = {"kind": "sparsify", "sparsity": 0.5}
    stages = [{"name": "a", **prune, "num_cpus": 3}, {"name": "b", **prune, "num_cpus": 2},
              {"name": "c", "kind": "eval", "needs": ["a", "b"], "num_cpus": 1},
              {"name": "d", "kind": "quantize", "needs": ["a"], "num_cpus": 1}]
    plan = plan_of(recipe_file(tmp_path, stages))
    assert plan["side_by_side"] == [["a", "b"], ["b", "d"], ["c", "d"]]
    assert plan["minimum"] == {"CPU": 3, "GPU": 0}
    assert plan["peak"]["CPU"] == 5 and plan["peak"]["stages"]["CPU"] == ["a", "b"]
    assert plan["largest_bundle"] == {"CPU": 3, "GPU": 0}
    pods = plan["worker_pods"]
    # Pods of 3 CPU: a (3) and b (2) need two; b + d and c + d fit in one each.
    assert (pods["cpus"], pods["gpus"], pods["replicas"]) == (3, 0, 2)
    # c runs a reward pool beside d's nothing: the driver's processes are 1 + eval's pool.
    assert plan["driver_processes"] == 3


def test_first_fit_decreasing_packing():
    half = ({"CPU": 1.5}, 1)
    assert len(pack([half, half, ({"CPU": 1}, 1)], {"CPU": 2, "GPU": 0})) == 3
    assert len(pack([({"CPU": 1}, 1)] * 4, {"CPU": 2, "GPU": 0})) == 2
    gpu = ({"CPU": 1, "GPU": 1}, 5)
    assert pack([gpu, ({"CPU": 1}, 7), gpu], {"CPU": 2, "GPU": 1}) == [[5, 7], [5]]


def _terms(plan: dict, stage: str, group: str) -> dict[str, int]:
    worker = next(w for w in next(s for s in plan["stages"] if s["name"] == stage)["workers"] if w["group"] == group)
    return {t["what"].split(" ")[0]: t["bytes"] for t in worker["memory"]["terms"]}


@pytest.mark.parametrize("dtype,bytes_,adamw", [("float32", 4, 8), ("bfloat16", 2, 12)])
def test_learner_memory_splits_by_zero_stage(dtype, bytes_, adamw):
    P = plan_of(TINY_RL)["model"]["parameters"]
    expected = {0: (1, 1, 1), 1: (1, 1, 2), 2: (1, 2, 2), 3: (2, 2, 2)}  # divisors of weights, grads, AdamW
    for zero, (w, g, o) in expected.items():
        terms = _terms(plan_of(TINY_RL, f"model.dtype={dtype}", "stages.train.learner.ranks=2",
                               f"stages.train.learner.zero_stage={zero}"), "train", "learner")
        assert (terms["weights"], terms["gradients"], terms["AdamW"]) == (
            P * bytes_ // w, P * bytes_ // g, P * adamw // o), zero
    offloaded = plan_of(TINY_RL, "stages.train.learner.zero_stage=1", "stages.train.learner.offload_optimizer=true",
                        "stages.train.learner.num_gpus_per_rank=1")
    learner = offloaded["stages"][0]["workers"][0]["memory"]
    assert "AdamW" not in _terms(offloaded, "train", "learner") and learner["device"] == "GPU"
    assert learner["host_bytes"] > P * 8  # the fp32 AdamW state lives in host memory


def test_engine_memory_follows_the_vllm_settings():
    plan = plan_of(TINY_RL, "stages.train.rollout.cpu_kvcache_gib=3", "stages.train.rollout.engines=2")
    assert _terms(plan, "train", "rollout")["KV"] == 3 * GIB
    assert plan["stages"][0]["bundles"] == [{"CPU": 1}, {"CPU": 1}, {"CPU": 1}]  # 1 learner + 2 engines
    gpu = build_plan(resolve(TINY_RL, ["stages.train.rollout.num_gpus_per_engine=1",
                                       "stages.train.rollout.gpu_memory_utilization=0.25"]), gpu_memory_gib=40)
    engine = gpu["stages"][0]["workers"][1]["memory"]
    assert engine["device"] == "GPU" and engine["total_bytes"] == 10 * GIB


def test_plan_command(capsys):
    assert main(["plan", TINY_RL, "stages.train.rollout.engines=2"]) == 0
    text = capsys.readouterr().out
    assert "placement group (PACK): 3 bundle(s) {1 CPU} ×3; holds 3 CPU" in text
    assert "557,312 parameters (exact, from config.json)" in text and "minimum cluster: 3 CPU" in text
    assert main(["plan", TINY_RL, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"][0]["bundles"] == [{"CPU": 1}, {"CPU": 1}]
    assert main(["plan", TINY_RL, "stages.train.learner.ranks=0"]) == EXIT_BAD_RECIPE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: stages.train.learner.ranks")


# ---------------------------------------------------------------- the RayJob manifest

def _without_memory(node):
    if isinstance(node, dict):
        return {k: _without_memory(v) for k, v in node.items() if k != "memory"}
    return [_without_memory(v) for v in node] if isinstance(node, list) else node


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_rayjob_of_every_shipped_recipe_validates_and_holds_the_peak(recipe):
    path = f"recipes/{recipe}"
    plan = plan_of(path)
    manifest = rayjob_manifest(plan, path, [])
    assert manifest_problems(manifest) == []
    assert manifest["spec"]["entrypoint"] == f"cd /home/ray/prunerl && python -m launch run {path}"
    group = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert group["replicas"] * int(limits["cpu"]) >= plan["peak"]["CPU"]
    assert group["replicas"] * int(limits.get("nvidia.com/gpu", 0)) >= plan["peak"]["GPU"]
    assert int(limits["cpu"]) >= plan["largest_bundle"]["CPU"]


BROKEN = {
    "a string for an integer": (lambda m: m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas="two"),
                                "spec.rayClusterSpec.workerGroupSpecs.0.replicas: 'two' is not of type 'integer'"),
    "a required field missing": (lambda m: m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"),
                                 "spec.rayClusterSpec.workerGroupSpecs.0: 'groupName' is a required property"),
    "a container without its name": (
        lambda m: m["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name"),
        "headGroupSpec.template.spec.containers.0: 'name' is a required property"),
    "an unknown field": (lambda m: m["spec"].update(shutdownAfterJobFinish=True),
                         "spec: Additional properties are not allowed ('shutdownAfterJobFinish' was unexpected)"),
    "a quantity that is not one": (
        lambda m: m["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
        ["limits"].update(memory="8 GB"), "resources.limits.memory: '8 GB' does not match"),
    "a number where ray start params are strings": (
        lambda m: m["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        "rayStartParams.num-cpus: 0 is not of type 'string'"),
    "a name KubeRay refuses": (lambda m: m["metadata"].update(name="Prunerl_Quickstart"), "metadata.name:"),
    "another kind": (lambda m: m.update(kind="RayCluster"), "apiVersion/kind: must be ray.io/v1 / RayJob"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_manifest_fails_validation(case):
    manifest = rayjob_manifest(plan_of("recipes/quickstart.yaml"), "recipes/quickstart.yaml", [])
    assert manifest_problems(manifest) == []
    breaking, expected = BROKEN[case]
    broken = copy.deepcopy(manifest)
    breaking(broken)
    problems = manifest_problems(broken)
    assert len(problems) == 1 and expected in problems[0], problems


def test_shipped_template_validates_and_is_what_the_generator_writes():
    text = TEMPLATE.read_text()
    shipped = yaml.safe_load(text)
    assert manifest_problems(shipped) == []
    assert text.startswith("#") and "kubectl apply" in text
    # Memory depends on whether the model's config.json can be read (the template was made with it).
    fresh = rayjob_manifest(plan_of("recipes/cppo_gsm8k.yaml"), "recipes/cppo_gsm8k.yaml", [])
    assert _without_memory(shipped) == _without_memory(fresh)


def test_rayjob_command_prints_only_a_valid_manifest(capsys):
    assert main(["plan", "recipes/quickstart.yaml", "stages.train.steps=5", "--rayjob", "--image", "r.io/prunerl:1",
                 "--namespace", "ml", "--pvc", ""]) == 0
    out = capsys.readouterr().out
    manifest = yaml.safe_load(out)
    assert manifest_problems(manifest) == [] and out.startswith("# RayJob for recipe 'quickstart'")
    assert manifest["metadata"] == {"name": "prunerl-quickstart", "namespace": "ml"}
    assert manifest["spec"]["entrypoint"].endswith("python -m launch run recipes/quickstart.yaml stages.train.steps=5")
    head = manifest["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["image"] == "r.io/prunerl:1" and [v["name"] for v in head["volumes"]] == ["dshm"]

    assert main(["plan", "recipes/quickstart.yaml", "--rayjob", "--name", "Not_A_Label"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: RayJob manifest: metadata.name: 'Not_A_Label'")


# ---------------------------------------------------------------- SLURM, and the plan against a real run

FAKE_SCONTROL = """#!/bin/sh
# A fake of SLURM's `scontrol show hostnames LIST` for a comma-separated LIST.
[ "$1 $2" = "show hostnames" ] || { echo "fake scontrol: only 'show hostnames'" >&2; exit 1; }
echo "$3" | tr ',' '\\n'
"""
FAKE_SRUN = """#!/bin/sh
# A fake of SLURM's srun on one machine: drop srun's options, run the command here.
while [ $# -gt 0 ]; do
  case "$1" in
    -w|-N|-n) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
exec "$@"
"""
# The run the sbatch script starts: an RL stage whose two workers ask for different CPUs, and a
# stage whose worker asks for none (so no placement group).
PROBE_STAGES = [{"name": "train", "kind": "rl", "steps": 1, "prompts_per_step": 4, "group_size": 2,
                 "rollout": {"max_new_tokens": 16, "num_cpus_per_engine": 2}, "learner": {"num_cpus_per_rank": 1}},
                {"name": "prune", "kind": "sparsify", "needs": ["train"], "sparsity": 0.5, "num_cpus": 0,
                 "calibration": {"samples": 4, "max_tokens": 32}}]
SLURM_CPUS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_processes(temp_dir: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(str(temp_dir) in part for part in (p.info["cmdline"] or [])):
            found.append(p)
    return found


@pytest.fixture(scope="module")
def sbatch_run(tmp_path_factory):
    """The sbatch script run with bash, fake `scontrol`/`srun` on PATH and SLURM's variables for
    one node of SLURM_CPUS CPUs; its Ray on private ports and its own temp dir."""
    tmp = tmp_path_factory.mktemp("slurm")
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    recipe = recipe_file(tmp, PROBE_STAGES, "probe.yaml")
    temp_dir = Path("/tmp") / f"prs{os.getpid()}"  # Ray's socket paths must stay short
    port = free_port()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "SLURM_JOB_NODELIST": socket.gethostname(), "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1",
           "SLURM_CPUS_PER_TASK": str(SLURM_CPUS), "SLURM_JOB_ID": f"fake{os.getpid()}", "SLURM_SUBMIT_DIR": str(REPO),
           "PRUNERL_VENV": str(Path(sys.executable).parent.parent), "PRUNERL_RAY_PORT": str(port),
           "PRUNERL_RAY_TEMP_DIR": str(temp_dir), "PRUNERL_RAY_WAIT_S": "120",
           "PRUNERL_HEAD_IP": "127.0.0.1",  # Ray on loopback only (the machine's own interface otherwise)
           "PRUNERL_RAY_HEAD_ARGS": f"--include-dashboard=false --dashboard-port={free_port()} "
                                    f"--ray-client-server-port={free_port()} "
                                    f"--dashboard-agent-listen-port={free_port()}"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        env.pop(key, None)
    run_dir = tmp / "run"
    try:
        out = subprocess.run(["bash", str(SBATCH), recipe, "--run-dir", str(run_dir)], cwd=tmp, env=env,
                             capture_output=True, text=True, timeout=900)
        deadline = time.time() + 30
        while ray_processes(temp_dir) and time.time() < deadline:
            time.sleep(1)
        left = [f"{p.pid} {' '.join(p.info['cmdline'] or [])[:100]}" for p in ray_processes(temp_dir)]
        yield {"out": out, "recipe": recipe, "run_dir": run_dir, "port": port, "left": left}
    finally:
        for p in ray_processes(temp_dir):  # only this fixture's Ray, if the script left any
            p.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_sbatch_starts_ray_runs_the_recipe_and_stops_ray(sbatch_run):
    out = sbatch_run["out"]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"Ray cluster up: 1 node(s), {SLURM_CPUS} CPU, 0 GPU" in out.stdout
    summary = json.loads((sbatch_run["run_dir"] / "summary.json").read_text())
    assert summary["state"] == "succeeded" and summary["stages"] == {"train": "done", "prune": "done"}
    assert "stopping Ray on 1 node(s)" in out.stdout
    assert sbatch_run["left"] == [], "Ray processes outlived the script"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", sbatch_run["port"]), timeout=2).close()


@pytest.mark.slow
def test_plan_bundles_are_what_the_run_reserved(sbatch_run):
    out = subprocess.run([sys.executable, "-m", "launch", "plan", sbatch_run["recipe"], "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    plan = json.loads(out.stdout)
    assert [s["name"] for s in plan["stages"]] == ["train", "prune"]
    for stage in plan["stages"]:
        held = json.loads((sbatch_run["run_dir"] / stage["name"] / "placement.json").read_text())
        assert held["bundles"] == stage["bundles"], stage["name"]
        if stage["bundles"]:
            assert held["state"] == "CREATED" and held["strategy"] == stage["strategy"]
    assert plan["stages"][0]["bundles"] == [{"CPU": 1}, {"CPU": 2}]  # learner, then the engine
    assert plan["stages"][1]["bundles"] == []
