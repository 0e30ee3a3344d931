"""The report's tables as (headers, rows of text): the run summary, the stages, the time per phase
and the eval results. The HTML page and report.png render the same rows."""
from __future__ import annotations

from launch.report.runs import Run, Series

Table = tuple[list[str], list[list[str]]]


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def seconds_per_step(run: Run) -> float | None:
    steps = sum(s.steps for s in run.series)
    return sum(s.training_s()[-1] for s in run.series) / steps if steps else None


def _step_weighted_mean(run: Run, key: str) -> float | None:
    values = [v for s in run.series for v in s.values(key)[1]]
    return sum(values) / len(values) if values else None


def relative_time(ratio: float | None, baseline: bool) -> str:
    if ratio is None:
        return "n/a"
    if baseline:
        return "1.00× (baseline)"
    change = (1 - ratio) * 100
    return f"{ratio:.2f}× ({abs(change):.0f}% {'less' if change >= 0 else 'more'})"


def eval_accuracy(run: Run) -> str:
    parts = []
    for stage, results in run.eval_results.items():
        scores = " · ".join(f"{name} {row['accuracy']:.3f}" for name, row in results.items()
                            if isinstance(row, dict) and isinstance(row.get("accuracy"), (int, float)))
        parts.append(f"{stage}: {scores}" if len(run.eval_results) > 1 else scores)
    return "; ".join(p for p in parts if p) or "n/a"


def steps_text(run: Run) -> str:
    if not run.series:
        return "n/a"
    done = sum(s.steps for s in run.series)
    planned = [run.planned_steps(s.stage) for s in run.series]
    return f"{done}/{sum(planned)}" if all(planned) and sum(planned) != done else str(done)


def summary_table(runs: list[Run]) -> Table:
    """One row per run. With several runs, each run's time per step against the first run's."""
    headers = ["run", "recipe", "algorithm", "RL steps", "wall time", "state", "eval accuracy",
               "train accuracy (last 10% of steps)", "training s/step"]
    optional = [(key, title) for key, title in (("select/tokens_saved", "tokens saved by selection"),
                                                ("pack/padding_frac", "padding"))
                if any(_step_weighted_mean(r, key) is not None for r in runs)]
    headers += [title for _, title in optional]
    if len(runs) > 1:
        headers.append(f"time per step vs {runs[0].label}")
    baseline = seconds_per_step(runs[0])
    rows = []
    for i, run in enumerate(runs):
        per_step = seconds_per_step(run)
        train_acc = [s.tail_mean("reward/accuracy") for s in run.series]
        row = [run.label, run.name, ", ".join(run.algorithms()) or "none (no RL stage)", steps_text(run),
               duration(run.wall_time_s()), run.state(), eval_accuracy(run),
               " · ".join(f"{a:.3f}" for a in train_acc if a is not None) or "n/a",
               "n/a" if per_step is None else f"{per_step:.2f} s"]
        for key, _ in optional:
            mean = _step_weighted_mean(run, key)
            row.append("n/a" if mean is None else f"{mean:.1%}")
        if len(runs) > 1:
            ratio = per_step / baseline if per_step is not None and baseline else None
            row.append(relative_time(ratio, i == 0))
        rows.append(row)
    return headers, rows


def stage_table(runs: list[Run]) -> Table:
    several = len(runs) > 1
    headers = (["run"] if several else []) + ["stage", "kind", "state", "RL steps", "stage time"]
    rows = []
    for run in runs:
        logged = {s.stage: s.steps for s in run.series}
        for stage in run.stages:
            status = run.statuses.get(stage["name"], {})
            kind = stage.get("kind", "rl")
            if kind == "rl":
                kind = f"rl ({stage.get('algorithm', '?')})"
            steps = "" if stage["name"] not in logged else str(logged[stage["name"]])
            state = status.get("state", "not started")
            if status.get("error"):
                state += f": {str(status['error']).splitlines()[0][:120]}"
            rows.append(([run.label] if several else []) +
                        [stage["name"], kind, state, steps, duration(run.stage_seconds(stage["name"]))])
    return headers, rows


def phase_table(series: list[Series]) -> Table:
    """Mean seconds per step in each phase, per RL stage: the numbers behind the timing figure."""
    totals = [s.phase_totals_s() for s in series]
    phases = list(dict.fromkeys(p for t in totals for p in t))
    rows = [[s.label, *(f"{t[p] / max(s.steps, 1):.3f}" if p in t else "" for p in phases),
             f"{s.training_s()[-1] / max(s.steps, 1):.3f}"] for s, t in zip(series, totals)]
    return ["RL stage (mean s per step)", *phases, "step + checkpoint"], rows


def eval_table(runs: list[Run]) -> Table | None:
    """Every eval stage's results.json, one row per artifact, with evaluation/table.py's columns;
    columns no row has are left out. None when no run has eval results."""
    from evaluation.table import COLUMNS, formatted_cells

    several_runs = len(runs) > 1
    several_stages = any(len(r.eval_results) > 1 for r in runs)
    lead = (["run"] if several_runs else []) + (["eval stage"] if several_stages else []) + ["artifact"]
    rows = []
    for run in runs:
        for stage, results in run.eval_results.items():
            for artifact, row in results.items():
                if isinstance(row, dict):
                    rows.append(([run.label] if several_runs else []) + ([stage] if several_stages else []) +
                                [artifact, *formatted_cells(row)])
    if not rows:
        return None
    keep = list(range(len(lead))) + [len(lead) + i for i in range(len(COLUMNS))
                                     if any(r[len(lead) + i] != "n/a" for r in rows)]
    headers = lead + [header for header, _, _ in COLUMNS]
    return [headers[i] for i in keep], [[r[i] for i in keep] for r in rows]
