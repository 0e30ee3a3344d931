"""Metrics: phase timers, `metrics.jsonl`, Weights & Biases, and one progress line per step.

W&B (docs/wandb.md): one run per stage, named `<run dir>/<stage>`, in the group of the recipe's name,
with the stage's kind (rl, sparsify, quantize, distill, eval) as its job type, so that the runs of one
recipe group together and one kind of stage compares across recipes. Its config is the resolved
recipe (every default filled in) plus, under `stage`, the stage's own resolved config. Every metric
key is `<section>/<name>` with a section of rl.metric_keys.SECTIONS; W&B builds its panel sections from the prefix.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import wandb

from rl.fileio import append_jsonl, read_jsonl, rewrite_jsonl
from rl.metric_keys import ELAPSED



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
        self.start = time.time() - elapsed_before(self.path, stage_name)
        self.wandb = open_wandb_run(recipe, run_dir, stage_name)
        if self.wandb is not None:
            print(f"[{stage_name}] W&B {self.wandb.settings.mode}: {self.wandb.dir}", flush=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        metrics = {**metrics, ELAPSED: time.time() - self.start}
        append_jsonl(self.path, {"stage": self.stage, "step": step, **metrics})
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.progress:
            print(progress_line(step, self.total_steps, metrics), flush=True)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def elapsed_before(path: Path, stage: str) -> float:
    """The stage's wall seconds at its last kept record (0 for a first attempt): a resumed stage's
    clock goes on from its checkpoint, leaving out the time the run was down."""
    return max((r.get(ELAPSED, 0.0) for r in read_jsonl(path) if r.get("stage") == stage), default=0.0)


def open_wandb_run(recipe, run_dir: Path, stage_name: str):
    """The stage's W&B run `<run dir>/<stage>` in the recipe's group (resumed when it exists), or
    None when W&B is disabled. `create_new`: stages running side by side in this process each get
    their own run."""
    settings = recipe.logging.wandb
    mode = os.environ.get("WANDB_MODE", settings.mode)
    if mode == "disabled":
        return None
    stage = next(s for s in recipe.stages if s.name == stage_name)
    return wandb.init(project=settings.project, entity=settings.entity, group=settings.group or recipe.name,
                      job_type=stage.kind, name=f"{run_dir.name}/{stage_name}", tags=settings.tags, mode=mode,
                      dir=str(run_dir), config=run_config(recipe, stage), resume="allow",
                      id=_wandb_id(run_dir, stage_name), reinit="create_new", settings=wandb.Settings(silent=True))


def run_config(recipe, stage) -> dict:
    """The resolved recipe, and the stage's resolved config under `stage` (filters such as
    `stage.algorithm = cppo` need no index into the recipe's list of stages)."""
    return {**recipe.model_dump(mode="json"), "stage": stage.model_dump(mode="json")}


def log_model_reference(recipe, run_dir: Path, stage_name: str, record: dict, log=print) -> None:
    """The model folder in a stage's artifact record, as a W&B `model` artifact in the stage's run:
    a reference per file (its `file://` URI and md5, so a changed model is a new version), nothing
    uploaded. A W&B failure is reported, not raised: the stage's model is already written."""
    model = record.get("model")
    if not model:
        return
    try:
        run = open_wandb_run(recipe, run_dir, stage_name)
        if run is None:
            return
        try:
            folder = Path(model).resolve()
            metadata = {"stage": stage_name, "run_dir": str(run_dir.resolve()), "path": str(folder),
                        **{k: v for k, v in record.items() if k != "model" and isinstance(v, (str, int, float, bool))}}
            artifact = wandb.Artifact(_artifact_name(f"{recipe.name}-{stage_name}"), type="model", metadata=metadata)
            artifact.add_reference(folder.as_uri(), checksum=True)
            run.log_artifact(artifact)
        finally:
            run.finish()
    except (wandb.Error, OSError, ValueError) as e:
        log(f"[{stage_name}] W&B: the model reference was not logged: {type(e).__name__}: {e}")


def _wandb_id(run_dir: Path, stage: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in f"{run_dir.name}-{stage}")[-64:]


def _artifact_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:128]


def progress_line(step: int, total: int, m: dict[str, float]) -> str:
    return (f"step {step:>4}/{total} | reward {m['reward/mean']:.3f} | acc {m['reward/accuracy']:.3f} "
            f"| len {m['response/length_mean']:.1f} | entropy {m['train/entropy']:.3f} "
            f"| grad {m['train/grad_norm']:.3f} | {m['timing/step']:.2f}s/step")


def drop_records_after(path: Path, stage: str, step: int) -> None:
    """A resumed stage repeats the steps after its checkpoint: drop their records (and a torn line)."""
    rewrite_jsonl(path, lambda r: not (r.get("stage") == stage and r.get("step", 0) > step))


def read_metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")
