"""`prunerl run | validate | submit` — the command line.

A bad recipe is reported before anything starts: one line per problem, naming the field path, exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import yaml

from launch.config import RecipeError, dump_recipe, load_recipe
from launch.preflight import preflight
from rl.fileio import write_json_atomic, write_text_atomic

EXIT_BAD_RECIPE = 2
# Modules that add their own subcommands: each has `register(subparsers)`. Their top-level imports
# stay light (the heavy ones inside the command), so `prunerl --help` stays fast.
COMMAND_MODULES = ("launch.recipe_tools", "launch.report", "launch.wandb_layout", "launch.plan")
UPLOAD_EXCLUDES = [".git", "runs", "checkpoints", ".venv", "wandb", "__pycache__", "*.egg-info"]


def resolve(recipe_path: str, overrides: list[str]):
    recipe = load_recipe(recipe_path, overrides)
    problems = preflight(recipe)
    if problems:
        raise RecipeError(problems)
    return recipe


def _fail(err: RecipeError) -> int:
    for line in err.problems:
        print(f"error: {line}", file=sys.stderr)
    return EXIT_BAD_RECIPE


RUN_ROOT_ENV = "PRUNERL_RUN_ROOT"
EXIT_INTERRUPTED = 130


def run_root(recipe) -> Path:
    """Where runs go: cluster.run_root, else $PRUNERL_RUN_ROOT, else ./runs — except inside a Ray
    job's working dir (a package cache Ray deletes, shared by jobs), where it is ~/prunerl-runs."""
    chosen = recipe.cluster.run_root or os.environ.get(RUN_ROOT_ENV)
    if chosen:
        return Path(chosen).expanduser().resolve()
    if "runtime_resources" in Path.cwd().parts:  # <ray temp dir>/session_*/runtime_resources/working_dir_files/...
        return Path("~/prunerl-runs").expanduser().resolve()
    return Path("runs").resolve()


def pick_run_dir(recipe, run_dir: str | None, resume: bool) -> Path:
    if run_dir:
        path = Path(run_dir).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise RecipeError([f"--run-dir: {path} is a file, not a folder"])
        return path
    root = run_root(recipe)
    if root.exists() and not root.is_dir():
        raise RecipeError([f"run root {root} is a file, not a folder (cluster.run_root / ${RUN_ROOT_ENV})"])
    if resume:
        previous = sorted(root.glob(f"{recipe.name}-2*"))
        if not previous:
            raise RecipeError([f"--resume: no earlier run of '{recipe.name}' under {root}/ (pass --run-dir)"])
        return previous[-1]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in ["", *(f"-{i}" for i in range(2, 1000))]:  # two runs started in the same second
        path = root / f"{recipe.name}-{stamp}{suffix}"
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise RecipeError([f"cannot create a new run folder under {root}"])


def init_ray(recipe) -> None:
    """Join cluster.address / $RAY_ADDRESS, or start a private local Ray (dashboard off)."""
    import logging

    import ray

    address = recipe.cluster.address or os.environ.get("RAY_ADDRESS")
    quiet = {"logging_level": logging.WARNING, "log_to_driver": recipe.logging.worker_logs}
    if address:
        ray.init(address=address, **quiet)
    else:
        if _local_cluster_running():
            print("[prunerl] a Ray cluster started with `ray start` runs on this machine; this run starts its "
                  "own private Ray instead (set cluster.address=auto or RAY_ADDRESS=auto to run on that one)",
                  flush=True)
        ray.init(address="local", num_cpus=recipe.cluster.num_cpus, num_gpus=recipe.cluster.num_gpus,
                 include_dashboard=False, **quiet)
    if not recipe.logging.worker_logs:
        logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
        print(f"[prunerl] worker logs (vLLM, DeepSpeed): {logs} on each node", flush=True)


def _local_cluster_running() -> bool:
    try:
        from ray._private.services import find_gcs_addresses

        return bool(find_gcs_addresses())
    except Exception:  # a private Ray helper: if it moves, the note above is simply not printed
        return False


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_run(args) -> int:
    try:
        recipe = resolve(args.recipe, args.overrides)
        run_dir = pick_run_dir(recipe, args.run_dir, args.resume)
        resolved = dump_recipe(recipe)
        recipe_file = run_dir / "recipe.yaml"
        if recipe_file.exists() and recipe_file.read_text() != resolved:
            earlier = yaml.safe_load(recipe_file.read_text()) or {}
            if earlier.get("name") != recipe.name:
                raise RecipeError([f"{run_dir}: holds a run of recipe '{earlier.get('name')}', not '{recipe.name}'; "
                                   f"pick another --run-dir"])
            print(f"[prunerl] the recipe changed since the last run in {run_dir}: stages whose config or inputs "
                  f"changed run again, the others are kept", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(recipe_file, resolved)
    except RecipeError as e:
        return _fail(e)
    except OSError as e:
        return _fail(RecipeError([f"run directory: {e.strerror or e}: {e.filename or ''}"]))
    print(f"[prunerl] run directory: {run_dir}", flush=True)

    import ray

    from launch.graph import StageFailed, run_graph
    from launch.stages import preload_runners
    from launch.resources import resource_problems
    from rl.liveness import RunInterrupted

    start, artifacts = time.time(), {}
    try:
        # The stage runners' imports (torch, transformers, datasets: ~10 s) overlap Ray's start.
        preload = threading.Thread(target=preload_runners, args=(recipe,), daemon=True)
        preload.start()
        init_ray(recipe)
        preload.join()
        # `ray job stop`, kill: stop like Ctrl-C. Installed after ray.init, whose own SIGTERM
        # handler would otherwise abort the process after ours ran.
        signal.signal(signal.SIGTERM, _raise_interrupt)
        problems = resource_problems(recipe, [n["Resources"] for n in ray.nodes() if n["Alive"]])
        if problems:
            raise RecipeError(problems)
        artifacts = run_graph(recipe, run_dir, resume=args.resume)
        state = "succeeded"
    except RecipeError as e:
        _fail(e)
        state = "failed"
    except StageFailed as e:
        print(f"[prunerl] {e}", file=sys.stderr)
        if args.debug:
            traceback.print_exception(e.__cause__ or e)
        state = "failed"
    except (RunInterrupted, KeyboardInterrupt):
        print("[prunerl] interrupted: workers stopped; continue with --resume", file=sys.stderr)
        state = "interrupted"
    finally:
        ray.shutdown()
    summary = write_summary(recipe, run_dir, artifacts, state, time.time() - start)
    print(f"[prunerl] {state} in {summary['wall_time_s']:.0f}s; summary: {run_dir / 'summary.json'}")
    for stage, acc in summary.get("eval", {}).items():
        print(f"[prunerl] stage '{stage}' greedy accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return {"succeeded": 0, "interrupted": EXIT_INTERRUPTED}.get(state, 1)


def write_summary(recipe, run_dir: Path, artifacts: dict, state: str, wall_time: float) -> dict:
    from launch.graph import read_status
    from rl.tracking import read_metrics

    summary = {"name": recipe.name, "run_dir": str(run_dir), "state": state, "wall_time_s": wall_time,
               "stages": {s.name: (read_status(run_dir / s.name) or {"state": "not started"})["state"]
                          for s in recipe.stages},
               "artifacts": artifacts,
               "eval": {name: a["accuracy"] for name, a in artifacts.items() if "accuracy" in a}}
    metrics = read_metrics(run_dir)
    if metrics:
        summary["last_rl_step"] = metrics[-1]
    write_json_atomic(run_dir / "summary.json", summary)
    return summary


def cmd_validate(args) -> int:
    try:
        recipe = resolve(args.recipe, args.overrides)
    except RecipeError as e:
        return _fail(e)
    print(dump_recipe(recipe), end="")
    return 0


def run_command(recipe_path: str, overrides: list[str], run_dir: str | None = None) -> str:
    """The shell command a Ray job runs for a recipe (`prunerl submit`, KubeRay's RayJob); each
    argument quoted, so an override may hold spaces or quotes."""
    return shlex.join(["python", "-m", "launch", "run", recipe_path, *overrides,
                       *(["--run-dir", run_dir] if run_dir else [])])


def cmd_submit(args) -> int:
    try:
        resolve(args.recipe, args.overrides)
    except RecipeError as e:
        return _fail(e)
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(args.address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265")
    job_id = client.submit_job(entrypoint=run_command(args.recipe, args.overrides, args.run_dir),
                               runtime_env={"working_dir": args.working_dir, "excludes": UPLOAD_EXCLUDES})
    print(f"[prunerl] submitted job {job_id} to {client.get_address()}", flush=True)
    if args.no_wait:
        return 0
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    printed = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        print(logs[printed:], end="", flush=True)
        printed = len(logs)
        if status in terminal:
            break
        time.sleep(2)
    print(f"[prunerl] job {job_id} {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """A command's RECIPE and its dotted overrides (run, validate, submit, plan)."""
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.train.steps=10")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunerl", description="Distributed RL post-training for reasoning LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe's job graph on Ray (local, or RAY_ADDRESS / cluster.address)")
    add_recipe_args(run)
    run.add_argument("--run-dir", help="run directory (default <run root>/<name>-<timestamp>, run root: "
                                       "cluster.run_root, $PRUNERL_RUN_ROOT or ./runs)")
    run.add_argument("--debug", action="store_true", help="print tracebacks of failures")
    run.add_argument("--resume", action="store_true",
                     help="skip finished stages and continue RL from the last checkpoint "
                          "(default run dir: the newest runs/<name>-*)")
    run.set_defaults(fn=cmd_run)

    val = sub.add_parser("validate", help="print the resolved recipe, or one line per problem (exit 2)")
    add_recipe_args(val)
    val.set_defaults(fn=cmd_validate)

    sub_p = sub.add_parser("submit", help="submit a recipe to a Ray cluster through the Ray Jobs API")
    add_recipe_args(sub_p)
    sub_p.add_argument("--address", help="Ray dashboard address (default: RAY_ADDRESS, else http://127.0.0.1:8265)")
    sub_p.add_argument("--working-dir", default=".", help="folder uploaded as the job's working dir")
    sub_p.add_argument("--run-dir", help="run directory on the cluster")
    sub_p.add_argument("--no-wait", action="store_true", help="return after submitting instead of following logs")
    sub_p.set_defaults(fn=cmd_submit)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except Exception as e:  # anything unforeseen: one line, the traceback only on request
        if getattr(args, "debug", False):
            raise
        print(f"error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}\n"
              f"(run again with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
