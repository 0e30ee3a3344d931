"""`prunerl plan RECIPE`: what a recipe will ask of the cluster, before anything starts.

Per stage: its workers (`stage.workers()`) and the placement group bundles the run reserves for
them, taken from `launch.stages.StagePlacement`, the object the run itself reserves with (each
stage's `placement.json` in the run dir records what Ray then held), so the plan cannot drift from
the run; a memory estimate per worker (launch/memory.py). Across stages:

    side by side   sets of stages with no `needs` path between any two: the graph may run them at once
    minimum        the largest stage's totals; a smaller cluster cannot run it, the others then wait
    peak           the largest total of any side-by-side set: a cluster this big never makes a
                   stage wait for another's resources
    worker pods    identical pods, each the largest bundle's CPUs and GPUs rounded up; replicas: the
                   most pods that first-fit-decreasing packing needs for any side-by-side set's
                   bundles; memory: the most host memory that packing puts on one pod, over
                   1 - OBJECT_STORE_FRACTION (Ray's object store takes that share of a node's memory)
"""
from __future__ import annotations

import json
import math
import sys

from launch.resources import KINDS

OBJECT_STORE_FRACTION = 0.3  # ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION
# Host memory assumed per worker when the model's config cannot be read (an offline machine and a
# hub model): per CPU and per GPU it reserves. `--pod-memory-gib` overrides.
ASSUMED_HOST_GIB = {"CPU": 4, "GPU": 32}
DEFAULT_GPU_MEMORY_GIB = 80


def concurrent_sets(stages) -> list[list[str]]:
    """The maximal sets of stages no two of which are joined by a path of `needs`, in recipe order."""
    import networkx as nx

    order = [s.name for s in stages]
    graph = nx.DiGraph([(need, s.name) for s in stages for need in s.needs])
    graph.add_nodes_from(order)
    independent = nx.complement(nx.transitive_closure_dag(graph).to_undirected())
    sets = [sorted(clique, key=order.index) for clique in nx.find_cliques(independent)]
    return sorted(sets, key=lambda names: [order.index(n) for n in names])


def reward_processes(stage) -> int:
    """Reward processes a stage runs in the driver (rewards/pool.py): an rl stage's rewards.workers,
    an eval stage's RewardPool default."""
    import inspect

    from rewards.pool import RewardPool

    if stage.kind == "rl":
        return stage.rewards.workers
    return inspect.signature(RewardPool).parameters["workers"].default if stage.kind == "eval" else 0


def _total(bundles: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(b.get(k, 0.0) for b in bundles) for k in KINDS}


def stage_plan(recipe, stage, gpu_memory_gib: float) -> dict:
    from launch.memory import stage_estimates
    from launch.stages import PLACEMENT_STRATEGY, StagePlacement

    placement = StagePlacement(stage)
    estimates = stage_estimates(recipe, stage, gpu_memory_gib)
    workers = []
    for w in stage.workers():
        memory = estimates[w.group]
        workers.append({"group": w.group, "path": w.path, "count": w.count, "cpus": w.cpus, "gpus": w.gpus,
                        "memory": {"unavailable": memory} if isinstance(memory, str) else memory.as_dict()})
    host = {w["group"]: w["memory"].get("host_bytes") for w in workers}
    bundles = placement.bundles()
    return {"name": stage.name, "kind": stage.kind, "needs": list(stage.needs), "workers": workers,
            "strategy": PLACEMENT_STRATEGY, "bundles": bundles, "totals": _total(bundles),
            # host memory of each bundle's worker, in bundle order (None: no estimate)
            "bundle_host_bytes": [host[group] for group, _ in placement.bundle_of]}


def _assumed_host(bundle: dict[str, float]) -> int:
    return int(sum(ASSUMED_HOST_GIB[k] * bundle.get(k, 0.0) for k in KINDS) * 2**30)


def pack(bundles: list[tuple[dict[str, float], int]], pod: dict[str, float]) -> list[list[int]]:
    """First-fit decreasing of (resources, host bytes) bundles into pods of `pod`'s CPUs and GPUs;
    the host bytes of each pod's bundles."""
    pods: list[tuple[dict[str, float], list[int]]] = []
    for resources, host in sorted(bundles, key=lambda b: (b[0].get("GPU", 0.0), b[0].get("CPU", 0.0)), reverse=True):
        for free, held in pods:
            if all(resources.get(k, 0.0) <= free[k] + 1e-9 for k in KINDS):
                break
        else:
            free, held = dict(pod), []
            pods.append((free, held))
        for k in KINDS:
            free[k] -= resources.get(k, 0.0)
        held.append(host)
    return [held for _, held in pods]


def worker_pods(stages: list[dict], sets: list[list[str]]) -> dict:
    """Identical worker pods that hold every side-by-side set of stages at once (module doc)."""
    bundles = [b for s in stages for b in s["bundles"]]
    if not bundles:
        return {"cpus": 0, "gpus": 0, "replicas": 0, "memory_bytes": 0, "memory_basis": "no bundles"}
    pod = {"CPU": max(1, math.ceil(max(b.get("CPU", 0.0) for b in bundles))),
           "GPU": math.ceil(max(b.get("GPU", 0.0) for b in bundles))}
    by_name = {s["name"]: s for s in stages}
    replicas, per_pod, assumed = 0, 0, False
    for names in sets:
        members = []
        for name in names:
            for resources, host in zip(by_name[name]["bundles"], by_name[name]["bundle_host_bytes"]):
                assumed |= host is None
                members.append((resources, _assumed_host(resources) if host is None else host))
        packed = pack(members, pod)
        replicas = max(replicas, len(packed))
        per_pod = max([per_pod, *(sum(held) for held in packed)])
    gib = max(1, math.ceil(per_pod / (1 - OBJECT_STORE_FRACTION) / 2**30))
    basis = (f"assumed {ASSUMED_HOST_GIB['CPU']} GiB per CPU and {ASSUMED_HOST_GIB['GPU']} GiB per GPU "
             f"(no model config)" if assumed else "estimate") + f", {OBJECT_STORE_FRACTION:.0%} of the pod left to Ray's object store"
    return {"cpus": pod["CPU"], "gpus": pod["GPU"], "replicas": replicas, "memory_bytes": gib * 2**30,
            "memory_basis": basis}


def build_plan(recipe, gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB) -> dict:
    from launch.memory import DTYPE_BYTES, model_shape

    stages = [stage_plan(recipe, s, gpu_memory_gib) for s in recipe.stages]
    sets = concurrent_sets(recipe.stages)
    by_name = {s["name"]: s for s in stages}
    minimum = {k: max(s["totals"][k] for s in stages) for k in KINDS}
    peak, peak_sets = {}, {}
    for k in KINDS:
        names = max(sets, key=lambda ns: sum(by_name[n]["totals"][k] for n in ns))
        peak[k], peak_sets[k] = sum(by_name[n]["totals"][k] for n in names), names
    bundles = [b for s in stages for b in s["bundles"]]
    shape = model_shape(recipe.model.path, recipe.model.trust_remote_code)
    rewards = {s.name: reward_processes(s) for s in recipe.stages}
    return {"recipe": recipe.name,
            "model": {"path": recipe.model.path, "dtype": recipe.model.dtype, "bytes_per_parameter":
                      DTYPE_BYTES[recipe.model.dtype],
                      **({"unavailable": shape} if isinstance(shape, str) else {"parameters": shape.parameters})},
            "gpu_memory_gib": gpu_memory_gib,
            "stages": stages,
            "side_by_side": [names for names in sets if len(names) > 1],
            "minimum": minimum,
            "peak": {**peak, "stages": peak_sets},
            "largest_bundle": {k: max((b.get(k, 0.0) for b in bundles), default=0.0) for k in KINDS},
            # The `prunerl run` process and its stages' reward processes: outside Ray's accounting.
            "driver_processes": 1 + max(sum(rewards[n] for n in names) for names in sets),
            "worker_pods": worker_pods(stages, sets)}


# ---------------------------------------------------------------- text

def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _resources(r: dict[str, float]) -> str:
    shown = [f"{v:g} {k}" for k, v in r.items() if k in KINDS and v]
    return ", ".join(shown) or "nothing"


def _bundles(bundles: list[dict[str, float]]) -> str:
    runs: list[list] = []
    for b in bundles:
        if runs and runs[-1][0] == b:
            runs[-1][1] += 1
        else:
            runs.append([b, 1])
    return ", ".join("{" + _resources(b) + "}" + (f" ×{n}" if n > 1 else "") for b, n in runs)


def format_plan(plan: dict, recipe_path: str) -> str:
    model = plan["model"]
    count = (f"{model['parameters']:,} parameters (exact, from config.json)" if "parameters" in model
             else f"no memory estimates: {model['unavailable']}")
    lines = [f"plan of recipe '{plan['recipe']}' ({recipe_path})",
             f"model {model['path']}: {count}, {model['dtype']} ({model['bytes_per_parameter']} bytes each)", ""]
    for s in plan["stages"]:
        lines.append(f"stage '{s['name']}' ({s['kind']})" + (f", needs {', '.join(s['needs'])}" if s["needs"] else ""))
        rows = [("workers", "field", "count", "CPU", "GPU", "memory each (estimate)")]
        for w in s["workers"]:
            m = w["memory"]
            memory = "n/a" if "unavailable" in m else f"{_size(m['total_bytes'])} {m['device']}"
            rows.append((w["group"], w["path"], str(w["count"]), f"{w['cpus']:g}", f"{w['gpus']:g}", memory))
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(widths[i]) if i < 2 or i == 5 else c.rjust(widths[i])
                                          for i, c in enumerate(r)).rstrip())
        lines.append(f"  placement group ({s['strategy']}): " + (
            f"{len(s['bundles'])} bundle(s) {_bundles(s['bundles'])}; holds {_resources(s['totals'])}"
            if s["bundles"] else "none (its workers ask for no resources)"))
        for w in s["workers"]:
            m = w["memory"]
            if "unavailable" in m:
                if m["unavailable"] != model.get("unavailable"):  # that one is said once, above
                    lines.append(f"  memory of {w['group']}: no estimate: {m['unavailable']}")
                continue
            terms = " + ".join(f"{t['what']} {_size(t['bytes'])}" for t in m["terms"] if t["bytes"])
            lines.append(f"  memory of {w['group']} ({m['device']}): {terms} = {_size(m['total_bytes'])}; "
                         f"host {_size(m['host_bytes'])}")
        lines.append("")
    sets = plan["side_by_side"]
    lines.append("side by side: " + ("; ".join(" + ".join(ns) for ns in sets) if sets
                                     else "none (each stage needs, directly or not, every stage before it)"))
    lines.append(f"minimum cluster: {_resources(plan['minimum'])} (the largest stage; the others wait for it)")
    peak = plan["peak"]
    lines.append("peak: " + "; ".join(f"{peak[k]:g} {k} ({' + '.join(peak['stages'][k])})" for k in KINDS if peak[k])
                 + " — with this much no stage waits for another's resources")
    lines.append(f"every node must fit the largest bundle: {{{_resources(plan['largest_bundle'])}}}")
    lines.append(f"driver: the `prunerl run` process and up to {plan['driver_processes'] - 1} reward process(es), "
                 f"outside Ray's accounting, on the node it runs on")
    pods = plan["worker_pods"]
    if pods["replicas"]:
        lines.append(f"KubeRay worker pods (--rayjob): {pods['replicas']} × {{{pods['cpus']} CPU"
                     + (f", {pods['gpus']} GPU" if pods["gpus"] else "")
                     + f", {_size(pods['memory_bytes'])} memory}} (memory: {pods['memory_basis']})")
    lines.append(f"memory: estimates from the model's shape (formulas: launch/memory.py, docs/cluster.md); "
                 f"GPU engines assume {plan['gpu_memory_gib']:g} GiB GPUs (--gpu-memory-gib)")
    return "\n".join(lines)


# ---------------------------------------------------------------- command

def cmd_plan(args) -> int:
    from launch.cli import _fail, resolve
    from launch.config import RecipeError

    try:
        recipe = resolve(args.recipe, args.overrides)
    except RecipeError as e:
        return _fail(e)
    plan = build_plan(recipe, args.gpu_memory_gib)
    if args.rayjob:
        from launch.rayjob import manifest_problems, rayjob_manifest, rayjob_yaml

        manifest = rayjob_manifest(plan, args.recipe, args.overrides, image=args.image, namespace=args.namespace,
                                   name=args.name, pvc=args.pvc, workdir=args.workdir, head_cpus=args.head_cpus,
                                   head_memory_gib=args.head_memory_gib, pod_memory_gib=args.pod_memory_gib)
        problems = manifest_problems(manifest)
        if problems:
            for line in problems:
                print(f"error: RayJob manifest: {line}", file=sys.stderr)
            return 1
        print(rayjob_yaml(manifest, plan, args.recipe), end="")
    elif args.json:
        print(json.dumps(plan, indent=1))
    else:
        print(format_plan(plan, args.recipe))
    return 0


def register(subparsers) -> None:
    from launch.cli import add_recipe_args
    from launch.rayjob import DEFAULT_HEAD_MEMORY_GIB, DEFAULT_IMAGE, DEFAULT_PVC, WORKDIR

    p = subparsers.add_parser("plan", help="print what a recipe asks of the cluster: workers, placement bundles, "
                                           "peak, memory estimates; or a KubeRay RayJob manifest")
    add_recipe_args(p)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="the plan as JSON")
    out.add_argument("--rayjob", action="store_true", help="a KubeRay RayJob manifest (YAML) sized from the plan, "
                                                            "validated against the RayJob CRD schema")
    p.add_argument("--gpu-memory-gib", type=float, default=DEFAULT_GPU_MEMORY_GIB,
                   help="memory of one GPU, for vLLM engines' gpu_memory_utilization (default 80)")
    kube = p.add_argument_group("RayJob (--rayjob)")
    kube.add_argument("--image", default=DEFAULT_IMAGE,
                      help=f"container image with prunerl installed in {WORKDIR} (launch/kuberay/Dockerfile)")
    kube.add_argument("--namespace", default="default")
    kube.add_argument("--name", help="RayJob name (default: prunerl-<recipe name>)")
    kube.add_argument("--pvc", default=DEFAULT_PVC,
                      help="a ReadWriteMany PersistentVolumeClaim for runs and the model cache, mounted on every pod "
                           "(empty: none; then use one worker pod)")
    kube.add_argument("--workdir", default=WORKDIR, help="the repository's folder in the image")
    kube.add_argument("--head-cpus", type=int, help="head pod CPUs (default: the plan's driver processes, at least 2)")
    kube.add_argument("--head-memory-gib", type=int, default=DEFAULT_HEAD_MEMORY_GIB)
    kube.add_argument("--pod-memory-gib", type=int, help="worker pod memory, instead of the plan's estimate")
    p.set_defaults(fn=cmd_plan)
