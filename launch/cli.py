"""`prunerl run | validate | submit` — the command line.

A bad recipe is reported before anything starts: one line per problem, naming the field path, exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from launch.config import RecipeError, dump_recipe, load_recipe

EXIT_BAD_RECIPE = 2
UPLOAD_EXCLUDES = [".git", "runs", "checkpoints", ".venv", "wandb", "__pycache__", "*.egg-info"]


def preflight(recipe) -> list[str]:
    """Checks that need the filesystem: local models and data files must exist before actors start."""
    problems = []
    if _looks_local(recipe.model.path) and not (Path(recipe.model.path) / "config.json").is_file():
        problems.append(f"model.path: no Hugging Face model folder (config.json) at {recipe.model.path}")
    for split in ("train", "eval"):
        src = getattr(recipe.data, split)
        if Path(src.path).suffix in {".jsonl", ".json", ".parquet"} and not Path(src.path).is_file():
            problems.append(f"data.{split}.path: file not found: {src.path}")
    return problems


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") != 1


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


def pick_run_dir(recipe, run_dir: str | None, resume: bool) -> Path:
    if run_dir:
        return Path(run_dir).resolve()
    runs = Path("runs")
    if resume:
        previous = sorted(runs.glob(f"{recipe.name}-2*"))
        if not previous:
            raise RecipeError([f"--resume: no earlier run of '{recipe.name}' under {runs}/ (pass --run-dir)"])
        return previous[-1].resolve()
    return (runs / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()


def init_ray(recipe) -> None:
    import logging

    import ray

    address = recipe.cluster.address or os.environ.get("RAY_ADDRESS")
    quiet = {"logging_level": logging.WARNING, "log_to_driver": recipe.logging.worker_logs}
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(num_cpus=recipe.cluster.num_cpus, num_gpus=recipe.cluster.num_gpus,
                 include_dashboard=False, **quiet)
    if not recipe.logging.worker_logs:
        logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
        print(f"[prunerl] worker logs (vLLM, DeepSpeed): {logs} on each node", flush=True)


def cmd_run(args) -> int:
    try:
        recipe = resolve(args.recipe, args.overrides)
        run_dir = pick_run_dir(recipe, args.run_dir, args.resume)
    except RecipeError as e:
        return _fail(e)
    resolved = dump_recipe(recipe)
    recipe_file = run_dir / "recipe.yaml"
    if recipe_file.exists() and recipe_file.read_text() != resolved:
        return _fail(RecipeError([f"{run_dir}: holds a run of a different recipe; resume it unchanged or pick another --run-dir"]))
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe_file.write_text(resolved)
    print(f"[prunerl] run directory: {run_dir}", flush=True)

    import ray

    from launch.graph import StageFailed, run_graph

    start = time.time()
    init_ray(recipe)
    try:
        artifacts = run_graph(recipe, run_dir, resume=args.resume)
        state = "succeeded"
    except StageFailed as e:
        print(f"[prunerl] {e}", file=sys.stderr)
        artifacts, state = {}, "failed"
    finally:
        ray.shutdown()
    summary = write_summary(recipe, run_dir, artifacts, state, time.time() - start)
    print(f"[prunerl] {state} in {summary['wall_time_s']:.0f}s; summary: {run_dir / 'summary.json'}")
    for stage, acc in summary.get("eval", {}).items():
        print(f"[prunerl] stage '{stage}' greedy accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return 0 if state == "succeeded" else 1


def write_summary(recipe, run_dir: Path, artifacts: dict, state: str, wall_time: float) -> dict:
    from launch.graph import read_status, write_json_atomic
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


def cmd_submit(args) -> int:
    try:
        resolve(args.recipe, args.overrides)
    except RecipeError as e:
        return _fail(e)
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(args.address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265")
    entrypoint = " ".join(["python -m launch run", args.recipe, *args.overrides])
    if args.run_dir:
        entrypoint += f" --run-dir {args.run_dir}"
    job_id = client.submit_job(entrypoint=entrypoint,
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunerl", description="Distributed RL post-training for reasoning LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    def recipe_args(p):
        p.add_argument("recipe", help="recipe YAML file")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.train.steps=10")

    run = sub.add_parser("run", help="run a recipe's job graph on Ray (local, or RAY_ADDRESS / cluster.address)")
    recipe_args(run)
    run.add_argument("--run-dir", help="run directory (default runs/<name>-<timestamp>)")
    run.add_argument("--resume", action="store_true",
                     help="skip finished stages and continue RL from the last checkpoint "
                          "(default run dir: the newest runs/<name>-*)")
    run.set_defaults(fn=cmd_run)

    val = sub.add_parser("validate", help="print the resolved recipe, or one line per problem (exit 2)")
    recipe_args(val)
    val.set_defaults(fn=cmd_validate)

    sub_p = sub.add_parser("submit", help="submit a recipe to a Ray cluster through the Ray Jobs API")
    recipe_args(sub_p)
    sub_p.add_argument("--address", help="Ray dashboard address (default: RAY_ADDRESS, else http://127.0.0.1:8265)")
    sub_p.add_argument("--working-dir", default=".", help="folder uploaded as the job's working dir")
    sub_p.add_argument("--run-dir", help="run directory on the cluster")
    sub_p.add_argument("--no-wait", action="store_true", help="return after submitting instead of following logs")
    sub_p.set_defaults(fn=cmd_submit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
