"""What every part of the recipe schema shares: strict models, usable names, and the base of a
stage kind (its name, its `needs`, the workers it places on the cluster).

Stage kinds live beside their code (`rl`, `evaluation`, `compress`) and are registered once, in
`launch.schema.STAGE_KINDS`; this module imports none of them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


# Recipe names become folders `<run_root>/<name>-<timestamp>`, stage names folders of the run dir.
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"
NAME_MAX_LENGTH = 64
# What a run dir holds besides one folder per stage (see launch/cli.py, rl/tracking.py, rl/controller.py,
# and launch/report: `prunerl report`'s default output).
RUN_DIR_ENTRIES = ("recipe.yaml", "summary.json", "metrics.jsonl", "checkpoints", "wandb", "report")
# Workers seed vLLM (which calls numpy's `np.random.seed`, limited to [0, 2**32)) with
# seed + engine index + 7919 * resumed step; keeping seeds below 2**31 leaves room for 2**31 / 7919
# (about 270,000) steps.
SEED_LIMIT = 2**31


def clip(text: str, limit: int = 60) -> str:
    """`text` cut to `limit` characters, for echoing user input in error messages."""
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def name_problem(name: str, stage: bool = False) -> str | None:
    """Why `name` cannot be a recipe (or, `stage`, a stage) folder name, or None when it can."""
    if len(name) > NAME_MAX_LENGTH:
        return f"{clip(name, 20)!r} is {len(name)} characters long; a name has at most {NAME_MAX_LENGTH}"
    if not re.fullmatch(NAME_PATTERN, name):
        return (f"{clip(name)!r} is not a usable folder name: use letters, digits, '_', '.' and '-', "
                f"and do not start with '.' or '-'")
    if stage and name.casefold() in RUN_DIR_ENTRIES:
        return (f"{name!r} would clash with the run directory's own {name.casefold()}; pick another "
                f"stage name (reserved: {', '.join(RUN_DIR_ENTRIES)})")
    return None


def _usable(stage: bool):
    def check(name: str) -> str:
        problem = name_problem(name, stage)
        if problem:
            raise ValueError(problem)
        return name
    return AfterValidator(check)


RecipeName = Annotated[str, _usable(stage=False)]
StageName = Annotated[str, _usable(stage=True)]
Beta = Annotated[float, Field(ge=0, lt=1)]


class Strict(BaseModel):
    # allow_inf_nan=False: `.inf`/`.nan` in any float field is an error naming that field.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              validate_by_name=True, serialize_by_alias=True)


@dataclass(frozen=True)
class WorkerDemand:
    """`count` workers of one kind a stage starts, each needing `cpus` and `gpus`; `path` is the
    recipe field that sets them (for error messages)."""
    group: str
    path: str
    count: int
    cpus: float
    gpus: float


class StageBase(Strict):
    name: StageName = Field(
        description=f"The stage's folder in the run dir: letters, digits, `_`, `.`, `-` (not first), at most "
                    f"{NAME_MAX_LENGTH}; not one of the run dir's own entries ({', '.join(RUN_DIR_ENTRIES)}).")
    needs: list[str] = Field([], description="Stages whose outputs this one reads.")

    def workers(self) -> list[WorkerDemand]:
        """The workers this stage places on the cluster; the graph reserves all of them at once
        (one placement group) before the stage starts."""
        raise NotImplementedError


class OneWorkerStage(StageBase):
    """A stage whose work runs in one Ray worker (`StageContext.remote`)."""
    num_cpus: float = Field(1, ge=0, description="CPUs reserved for the stage's worker.")
    num_gpus: float = Field(0, ge=0, description="GPUs reserved for the stage's worker.")

    def workers(self) -> list[WorkerDemand]:
        return [WorkerDemand("main", f"stages.{self.name}", 1, self.num_cpus, self.num_gpus)]


@dataclass(frozen=True)
class StageKind:
    """One registration per stage kind: its config class and its runner (`module:function`, taking a
    `launch.stages.StageContext` and returning the stage's artifact record)."""
    config: type[StageBase]
    runner: str


class OptimConfig(Strict):
    """AdamW and its LR schedule (the RL learner's and the distill stage's)."""
    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="AdamW (beta1, beta2), each in [0, 1).")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="Max global grad norm; 0 disables clipping.")
