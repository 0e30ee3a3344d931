"""Stage kinds: each maps to a function `run(ctx) -> artifact record` (a JSON-able dict).

Adding a kind means a config class in `launch.schema` and an entry here; the graph runner knows
nothing about particular kinds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class StageContext:
    recipe: object
    stage: object
    run_dir: Path
    stage_dir: Path
    inputs: dict[str, dict]  # artifact records of the stages this one `needs`
    resume: bool


def _rl(ctx):
    from rl.controller import run_rl_stage
    return run_rl_stage(ctx)


def _eval(ctx):
    from rl.evaluate import run_eval_stage
    return run_eval_stage(ctx)


STAGE_RUNNERS = {"rl": _rl, "eval": _eval}


def run_stage(recipe, name: str, run_dir: Path, inputs: dict, resume: bool) -> dict:
    stage = next(s for s in recipe.stages if s.name == name)
    ctx = StageContext(recipe, stage, run_dir, run_dir / name, inputs, resume)
    return STAGE_RUNNERS[stage.kind](ctx)
