"""Stage kinds: each maps to a function `run(ctx) -> artifact record` (a JSON-able dict).

Adding a kind means a config class in `launch.schema` and an entry here; the graph runner knows
nothing about particular kinds.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from rl.liveness import WorkerFailure

STAGE_RUNNERS = {"rl": "rl.controller:run_rl_stage", "eval": "rl.evaluate:run_eval_stage"}


@dataclass
class StageContext:
    recipe: object
    stage: object
    run_dir: Path
    stage_dir: Path
    inputs: dict[str, dict]  # artifact records of the stages this one `needs`
    resume: bool


def preload_runners(recipe) -> None:
    """Import every stage kind's runner module ahead of `run_graph` (from one thread: see
    load_runner). A failing import is left for `load_runner` to raise in the main thread."""
    for stage in recipe.stages:
        try:
            importlib.import_module(STAGE_RUNNERS[stage.kind].partition(":")[0])
        except Exception:  # noqa: BLE001 - raised again, with its traceback, by load_runner
            pass


def load_runner(kind: str):
    """Import a kind's runner. Call from the main thread: concurrent first imports of
    transformers' lazy modules from stage threads fail ("cannot import name AutoTokenizer")."""
    module, _, name = STAGE_RUNNERS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def run_stage(runner, recipe, name: str, run_dir: Path, inputs: dict, resume: bool, log=print) -> dict:
    """Run a stage; when one of its workers dies or stops answering, stop all its workers and
    start again from its last checkpoint, up to `cluster.max_restarts` times."""
    stage = next(s for s in recipe.stages if s.name == name)
    restarts = recipe.cluster.max_restarts
    for attempt in range(restarts + 1):
        try:
            return runner(StageContext(recipe, stage, run_dir, run_dir / name, inputs, resume or attempt > 0))
        except WorkerFailure as failure:
            if attempt == restarts:
                spent = f"after {restarts} restart(s)" if restarts else "no restart: cluster.max_restarts is 0"
                raise WorkerFailure(f"{failure} ({spent})", failure.workers) from None
            log(f"[graph] stage '{name}': {failure}; restarting its workers from the last checkpoint "
                f"(restart {attempt + 1} of {restarts})")
