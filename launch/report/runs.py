"""What a report reads from a run directory, and the numbers it derives from them.

A run directory holds `recipe.yaml` (the resolved recipe), `summary.json` (written when `prunerl run`
ends), `metrics.jsonl` (one record per RL step: `stage`, `step`, `reward/*`, `timing/*`, ...) and one
folder per stage with its `status.json` (an eval stage adds `results.json`). A report is also made of
runs still going, killed, or written by an older version: a missing file or field reads as None.
The recipe is read as plain YAML, not validated, so a run recorded under an older schema still reads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rl.fileio import read_jsonl
from rl.metric_keys import AFTER_STEP_PHASES, ELAPSED, STEP_PHASES


class ReportError(ValueError):
    """A run directory a report cannot be made of; the message is one line naming it."""


@dataclass
class Series:
    """One RL stage of one run: its records in step order."""
    label: str
    stage: str
    records: list[dict]

    def has(self, key: str) -> bool:
        return any(key in r for r in self.records)

    def values(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of the records that have `key`."""
        rows = [(r["step"], r[key]) for r in self.records if r.get(key) is not None]
        return [s for s, _ in rows], [v for _, v in rows]

    @property
    def wall_clock(self) -> bool:
        """Whether every record has the stage's wall seconds (rl.tracking logs them; older runs did not)."""
        return all(r.get(ELAPSED) is not None for r in self.records)

    def clock_s(self) -> list[float]:
        """The stage's wall seconds at each step (from the stage's start, engine start-up included,
        a resumed stage's downtime left out); see `wall_clock`."""
        return [r[ELAPSED] for r in self.records]

    def training_s(self) -> list[float]:
        """Training time at the end of each step: the steps' and checkpoints' seconds summed
        (engine start-up and model saving are outside; see `Run.stage_seconds`)."""
        total, out = 0.0, []
        for r in self.records:
            total += r.get("timing/step", 0.0) + sum(r.get(f"timing/{p}", 0.0) for p in AFTER_STEP_PHASES)
            out.append(total)
        return out

    def phases(self) -> list[str]:
        """Phase names logged by this stage, except `step`, in the order they run (a phase
        rl.tracking does not list comes after them)."""
        logged = {k.removeprefix("timing/") for r in self.records for k in r if k.startswith("timing/")} - {"step"}
        known = [p for p in (*STEP_PHASES, *AFTER_STEP_PHASES) if p in logged]
        return known + sorted(logged - set(known))

    def phase_totals_s(self) -> dict[str, float]:
        """Seconds per phase over the stage; `other` is the part of the steps no phase timer covers."""
        seconds = {p: sum(r.get(f"timing/{p}", 0.0) for r in self.records) for p in self.phases()}
        inside = {p: s for p, s in seconds.items() if p not in AFTER_STEP_PHASES}
        other = sum(r.get("timing/step", 0.0) for r in self.records) - sum(inside.values())
        if other > 1e-9:
            inside["other"] = other
        return {**inside, **{p: s for p, s in seconds.items() if p in AFTER_STEP_PHASES}}

    @property
    def steps(self) -> int:
        return self.records[-1]["step"] if self.records else 0

    def tail_mean(self, key: str, fraction: float = 0.1) -> float | None:
        """The mean of `key` over the last `fraction` of the steps (at least one)."""
        _, values = self.values(key)
        if not values:
            return None
        tail = values[-max(1, round(len(values) * fraction)):]
        return sum(tail) / len(tail)


@dataclass
class Run:
    path: Path
    recipe: dict
    summary: dict
    metrics: list[dict]
    statuses: dict[str, dict]
    eval_results: dict[str, dict]  # eval stage -> its results.json
    label: str = ""
    series: list[Series] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.recipe.get("name") or self.path.name)

    @property
    def stages(self) -> list[dict]:
        return [s for s in self.recipe.get("stages") or [] if isinstance(s, dict) and "name" in s]

    def rl_stage_names(self) -> list[str]:
        """The recipe's RL stages, then any stage with metrics the recipe no longer names."""
        names = [s["name"] for s in self.stages if s.get("kind", "rl") == "rl"]
        return names + [n for n in dict.fromkeys(r.get("stage") for r in self.metrics) if n and n not in names]

    def algorithms(self) -> list[str]:
        return list(dict.fromkeys(s.get("algorithm", "?") for s in self.stages if s.get("kind", "rl") == "rl"))

    def planned_steps(self, stage: str) -> int | None:
        return next((s.get("steps") for s in self.stages if s["name"] == stage), None)

    def stage_seconds(self, stage: str) -> float | None:
        status = self.statuses.get(stage) or {}
        if status.get("started") is None or status.get("finished") is None:
            return None
        return status["finished"] - status["started"]

    def wall_time_s(self) -> float | None:
        """From the first stage's start to the last one's end; summary.json's wall time (of the last
        `prunerl run`, which may have resumed a finished run and skipped every stage) without them."""
        spans = [(s["started"], s["finished"]) for s in self.statuses.values()
                 if s.get("started") is not None and s.get("finished") is not None]
        if spans:
            return max(f for _, f in spans) - min(s for s, _ in spans)
        return self.summary.get("wall_time_s")

    def state(self) -> str:
        if self.summary.get("state"):
            return self.summary["state"]
        return "running or stopped" if self.statuses else "not started"


def _read_yaml(path: Path) -> dict:
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ReportError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ReportError(f"{path}: not a recipe (expected a mapping at the top)")
    return tree


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e.msg})") from None
    return value if isinstance(value, dict) else {}


def load_run(path: str | Path) -> Run:
    run_dir = Path(path).expanduser()
    if not run_dir.exists():
        raise ReportError(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: a file, not a run directory")
    if not (run_dir / "recipe.yaml").is_file():
        raise ReportError(f"{run_dir}: no recipe.yaml, so not a prunerl run directory")
    recipe = _read_yaml(run_dir / "recipe.yaml")
    try:
        metrics = read_jsonl(run_dir / "metrics.jsonl")
    except ValueError as e:
        raise ReportError(str(e)) from None
    stage_names = [s["name"] for s in recipe.get("stages") or [] if isinstance(s, dict) and "name" in s]
    statuses = {n: _read_json(run_dir / n / "status.json") for n in stage_names
                if (run_dir / n / "status.json").exists()}
    eval_results = {n: _read_json(run_dir / n / "results.json") for n in stage_names
                    if (run_dir / n / "results.json").exists()}
    if not metrics and not eval_results:
        raise ReportError(f"{run_dir}: nothing to report yet: metrics.jsonl has no records and no stage wrote "
                          f"results.json")
    return Run(run_dir, recipe, _read_json(run_dir / "summary.json"), metrics, statuses, eval_results)


def unique_labels(runs: list[Run]) -> list[str]:
    """The shortest naming that tells the runs apart: recipe name, run folder, parent/folder, path."""
    namings = [lambda r: r.name, lambda r: r.path.name, lambda r: f"{r.path.parent.name}/{r.path.name}",
               lambda r: str(r.path.resolve())]
    for naming in namings:
        labels = [naming(r) for r in runs]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{label} #{i + 1}" for i, label in enumerate(labels)]


def load_runs(paths: list[str | Path]) -> list[Run]:
    """The runs, labelled, each with one Series per RL stage that logged a step (label
    `<run>/<stage>` when the run has several RL stages)."""
    runs = [load_run(p) for p in paths]
    for run, label in zip(runs, unique_labels(runs)):
        run.label = label
        names = run.rl_stage_names()
        by_stage = {name: {} for name in names}
        for record in run.metrics:
            if record.get("stage") in by_stage and isinstance(record.get("step"), int):
                by_stage[record["stage"]][record["step"]] = record  # a resumed step: its last record
        logged = {name: [steps[k] for k in sorted(steps)] for name, steps in by_stage.items() if steps}
        run.series = [Series(label if len(names) == 1 else f"{label}/{name}", name, records)
                      for name, records in logged.items()]
    return runs
