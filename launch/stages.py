"""Running one stage: its reserved resources, its context, and restarts after worker failures.

Stage kinds are registered in `launch.schema.STAGE_KINDS` (config class + runner); the graph runner
knows nothing about particular kinds.
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray

from launch.schema import STAGE_KINDS
from rl.fileio import write_json_atomic
from rl.liveness import STOP_POLL_S, WorkerFailure, check_stop, gather

WAIT_REPORT_S = 30  # how often a stage waiting for resources says so
FIRST_WAIT_REPORT_S = 2  # placing a group that fits takes a moment: only a longer wait is reported
PLACEMENT_STRATEGY = "PACK"  # a stage's workers on as few nodes as fit them (launch/plan.py sizes pods by it)


class StagePlacement:
    """A stage's workers reserved all at once: one placement group, a bundle per worker of
    `stage.workers()`, in order. All-at-once means two stages never each hold half of what they
    need; a stage that does not fit yet waits for others to finish."""

    def __init__(self, stage):
        self.stage, self.pg = stage, None
        self.workers: dict[tuple[str, int], dict[str, float]] = {}  # (group, index) -> its resources
        for demand in stage.workers():
            for index in range(demand.count):
                self.workers[demand.group, index] = {k: v for k, v in (("CPU", demand.cpus), ("GPU", demand.gpus)) if v}
        # Workers that need nothing stay out of the group (Ray refuses empty bundles).
        self.bundle_of = {key: i for i, key in enumerate(k for k, r in self.workers.items() if r)}

    def bundles(self) -> list[dict[str, float]]:
        """The placement group's bundles, in order: one per worker that needs resources (what
        `prunerl plan` prints, launch/plan.py)."""
        return [self.workers[key] for key in self.bundle_of]

    def reserve(self, log=print) -> None:
        """Create the placement group and wait for it, saying what it waits for every WAIT_REPORT_S.
        No deadline: `launch.resources` checked before the run that the cluster can hold it."""
        from ray.util.placement_group import placement_group

        if not self.bundle_of:
            return
        self.pg = placement_group(self.bundles(), strategy=PLACEMENT_STRATEGY)
        ready, waited, next_report = self.pg.ready(), False, time.monotonic() + FIRST_WAIT_REPORT_S
        while not ray.wait([ready], timeout=STOP_POLL_S)[0]:
            check_stop()
            if time.monotonic() >= next_report:
                needed = {k: sum(r.get(k, 0) for r in self.workers.values()) for k in ("CPU", "GPU")}
                free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
                log(f"[graph] stage '{self.stage.name}' waiting for resources: needs "
                    f"{', '.join(f'{v:g} {k}' for k, v in needed.items() if v)}; free now: "
                    f"{', '.join(f'{v:g} {k}' for k, v in free.items()) or 'nothing'}")
                waited, next_report = True, time.monotonic() + WAIT_REPORT_S
        if waited:
            log(f"[graph] stage '{self.stage.name}' has its resources")

    def options(self, group: str, index: int) -> dict:
        """Ray `.options(...)` kwargs for worker `index` of `group`: its resources, in its bundle."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        resources = self.workers[group, index]
        options = {"num_cpus": resources.get("CPU", 0), "num_gpus": resources.get("GPU", 0)}
        if (group, index) in self.bundle_of and self.pg is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=self.bundle_of[group, index])
        return options

    def held(self) -> dict:
        """What Ray holds for the stage, from its placement group table: `<stage>/placement.json`."""
        from ray.util.placement_group import placement_group_table

        record = {"stage": self.stage.name, "workers": {f"{g}/{i}": self.bundle_of.get((g, i)) for g, i in self.workers},
                  "bundles": [], "nodes": []}
        if self.pg is not None:
            table = placement_group_table(self.pg)
            order = sorted(table["bundles"])
            record.update(placement_group=table["placement_group_id"], strategy=table["strategy"], state=table["state"],
                          bundles=[table["bundles"][i] for i in order],
                          nodes=[table["bundles_to_node_id"].get(i) for i in order])
        return record

    def release(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None


@dataclass
class StageContext:
    recipe: object
    stage: object
    run_dir: Path
    stage_dir: Path
    inputs: dict[str, dict]  # artifact records of the stages this one `needs`
    resume: bool
    placement: StagePlacement = field(repr=False, default=None)

    def input_model(self, exclude: tuple[str, ...] = ()) -> str:
        """The model folder this stage reads: its input stage's model (leaving out the stages in
        `exclude`, such as a distill stage's teacher), else the recipe's."""
        models = {n: a["model"] for n, a in self.inputs.items() if a.get("model") and n not in exclude}
        if len(models) > 1:
            raise ValueError(f"stage '{self.stage.name}' needs {len(models)} stages with a model "
                             f"({', '.join(models)}); it reads one")
        return next(iter(models.values()), self.recipe.model.path)

    def input_masks(self) -> str | None:
        """The sparsity masks that came with the input model (a sparsify stage's), if any."""
        return next((a["masks"] for a in self.inputs.values() if a.get("masks")), None)

    def remote(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` in a Ray worker on the stage's reserved resources; its result."""
        options = self.placement.options("main", 0)
        env = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(max(1, int(options["num_cpus"])))}
        ref = ray.remote(fn).options(**options, max_retries=0, runtime_env={"env_vars": env}).remote(*args, **kwargs)
        try:
            return gather([ref], [f"stage '{self.stage.name}' worker"], getattr(fn, "__name__", "work"),
                          self.recipe.cluster.liveness.call_timeout_s)[0]
        except BaseException:  # a stop request or a deadline: do not leave the work running
            ray.cancel(ref, force=True)
            raise


def preload_runners(recipe) -> None:
    """Import every stage kind's runner module ahead of `run_graph` (from one thread: see
    load_runner). A failing import is left for `load_runner` to raise in the main thread."""
    for stage in recipe.stages:
        try:
            importlib.import_module(STAGE_KINDS[stage.kind].runner.partition(":")[0])
        except Exception:  # noqa: BLE001 - raised again, with its traceback, by load_runner
            pass


def load_runner(kind: str):
    """Import a kind's runner. Call from the main thread: concurrent first imports of
    transformers' lazy modules from stage threads fail ("cannot import name AutoTokenizer")."""
    module, _, name = STAGE_KINDS[kind].runner.partition(":")
    return getattr(importlib.import_module(module), name)


def run_stage(runner, recipe, name: str, run_dir: Path, inputs: dict, resume: bool, log=print, on_placed=None) -> dict:
    """Reserve the stage's resources, then run it; when one of its workers dies or stops answering,
    stop all its workers and start again from its last checkpoint, up to `cluster.max_restarts` times."""
    stage = next(s for s in recipe.stages if s.name == name)
    placement = StagePlacement(stage)
    try:
        placement.reserve(log)
        write_json_atomic(run_dir / name / "placement.json", placement.held())
        if on_placed is not None:
            on_placed()
        restarts = recipe.cluster.max_restarts
        for attempt in range(restarts + 1):
            try:
                return runner(StageContext(recipe, stage, run_dir, run_dir / name, inputs, resume or attempt > 0,
                                           placement))
            except WorkerFailure as failure:
                if attempt == restarts:
                    spent = f"after {restarts} restart(s)" if restarts else "no restart: cluster.max_restarts is 0"
                    raise WorkerFailure(f"{failure} ({spent})", failure.workers) from None
                log(f"[graph] stage '{name}': {failure}; restarting its workers from the last checkpoint "
                    f"(restart {attempt + 1} of {restarts})")
    finally:
        placement.release()
