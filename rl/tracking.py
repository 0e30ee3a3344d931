"""Metrics: phase timers, `metrics.jsonl`, Weights & Biases, and one progress line per step."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import wandb

from rl.fileio import append_jsonl, read_jsonl, rewrite_jsonl


class Timers:
    """`with timers("rollout"): ...` records `timing/rollout` in seconds for the current step."""

    def __init__(self):
        self.values: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.values[f"timing/{phase}"] = self.values.get(f"timing/{phase}", 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out, self.values = self.values, {}
        return out


class Tracker:
    def __init__(self, run_dir: Path, recipe, stage_name: str, total_steps: int, start_step: int = 0,
                 progress: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.stage, self.total_steps, self.progress = stage_name, total_steps, progress
        drop_records_after(self.path, stage_name, start_step)
        self.start = time.time()
        self.wandb = open_wandb_run(recipe, run_dir, stage_name)
        if self.wandb is not None:
            print(f"[{stage_name}] W&B {self.wandb.settings.mode}: {self.wandb.dir}", flush=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        append_jsonl(self.path, {"stage": self.stage, "step": step, **metrics})
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.progress:
            print(progress_line(step, self.total_steps, metrics), flush=True)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def open_wandb_run(recipe, run_dir: Path, stage_name: str):
    """The stage's W&B run `<run dir>/<stage>` in the recipe's group (resumed when it exists), or
    None when W&B is disabled. `create_new`: stages running side by side in this process each get
    their own run."""
    settings = recipe.logging.wandb
    mode = os.environ.get("WANDB_MODE", settings.mode)
    if mode == "disabled":
        return None
    return wandb.init(project=settings.project, entity=settings.entity, group=settings.group or recipe.name,
                      name=f"{run_dir.name}/{stage_name}", tags=settings.tags, mode=mode, dir=str(run_dir),
                      config=recipe.model_dump(mode="json"), resume="allow", id=_wandb_id(run_dir, stage_name),
                      reinit="create_new", settings=wandb.Settings(silent=True))


def _wandb_id(run_dir: Path, stage: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in f"{run_dir.name}-{stage}")[-64:]


def progress_line(step: int, total: int, m: dict[str, float]) -> str:
    return (f"step {step:>4}/{total} | reward {m['reward/mean']:.3f} | acc {m['reward/accuracy']:.3f} "
            f"| len {m['response/length_mean']:.1f} | entropy {m['train/entropy']:.3f} "
            f"| grad {m['train/grad_norm']:.3f} | {m['timing/step']:.2f}s/step")


def drop_records_after(path: Path, stage: str, step: int) -> None:
    """A resumed stage repeats the steps after its checkpoint: drop their records (and a torn line)."""
    rewrite_jsonl(path, lambda r: not (r.get("stage") == stage and r.get("step", 0) > step))


def read_metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")
