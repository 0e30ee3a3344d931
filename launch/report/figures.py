"""The report's figures, drawn with matplotlib's Agg renderer (no display, no pyplot state).

Each section draws into a matplotlib Figure or SubFigure, so the HTML page gets one PNG per section
and `report.png` gets every section in one figure from the same code. Colours follow the series
(one run / RL stage) through every section.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

from launch.report.runs import Series
from rl.metric_keys import AFTER_STEP_PHASES

WIDTH_IN, DPI = 12.0, 100
SMOOTH_FROM_STEPS = 20  # shorter curves are drawn point by point
SELECTION_PANELS = (("select/kept_frac", "completions kept for training"),
                    ("pack/padding_frac", "padding in the training micro-batches"))
STARTUP = "start-up & save"  # stage wall time outside the steps: engines, learners, final model


@dataclass
class Section:
    key: str
    title: str
    caption: str
    height_in: float
    draw: Callable  # draw(figure_or_subfigure) -> None


def series_colors(series: list[Series]) -> dict[str, tuple]:
    from matplotlib import colormaps

    palette = colormaps["tab10" if len(series) <= 10 else "tab20"].colors
    return {s.label: palette[i % len(palette)] for i, s in enumerate(series)}


def phase_colors(phases: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    palette = [c for i, c in enumerate(colormaps["Set2"].colors) if i != 7]  # Set2's last is grey
    named = {"other": (0.6, 0.6, 0.6), STARTUP: (0.85, 0.85, 0.85)}
    rest = [p for p in phases if p not in named]
    return {**{p: palette[i % len(palette)] for i, p in enumerate(rest)}, **named}


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def use_wall_clock(series: list[Series]) -> bool:
    """Wall seconds on the time axis when every series logged them; else, so that the curves compare,
    every series' training time (older runs did not log wall seconds)."""
    return all(s.wall_clock for s in series)


def time_axis(series: list[Series]) -> tuple[str, float, str]:
    """What the time axis shows, and its divisor and unit (minutes past 20 minutes)."""
    wall = use_wall_clock(series)
    longest = max(((s.clock_s() if wall else s.training_s())[-1] for s in series), default=0.0)
    name = "wall time in the stage" if wall else "training time"
    return (name, 60.0, "min") if longest > 1200 else (name, 1.0, "s")


def time_caption(series: list[Series]) -> str:
    if use_wall_clock(series):
        return "wall time: seconds since the stage started (time/elapsed_s), engine start-up included"
    return "training time: the steps' and checkpoints' seconds summed (not every run logged time/elapsed_s)"


def _legend(fig, handles_labels: dict, columns: int) -> None:
    fig.legend(list(handles_labels.values()), list(handles_labels), loc="outside lower center",
               ncols=max(1, min(columns, len(handles_labels))), frameon=False)


def draw_learning(fig, series: list[Series], colors: dict) -> None:
    """reward/mean and reward/accuracy against step and against training time."""
    axes = fig.subplots(2, 2, sharey="row")
    clock, divisor, unit = time_axis(series)
    handles = {}
    for row, (key, name) in enumerate((("reward/mean", "mean reward"), ("reward/accuracy", "accuracy"))):
        for col in (0, 1):
            ax = axes[row][col]
            for s in series:
                steps, values = s.values(key)
                if not values:
                    continue
                seconds = s.clock_s() if use_wall_clock(series) else s.training_s()
                x = steps if col == 0 else [t / divisor for r, t in zip(s.records, seconds) if r.get(key) is not None]
                if len(values) >= SMOOTH_FROM_STEPS:
                    ax.plot(x, values, color=colors[s.label], alpha=0.25, linewidth=0.8)
                    line, = ax.plot(x, moving_average(values, max(2, len(values) // 10)), color=colors[s.label],
                                    linewidth=2)
                else:
                    line, = ax.plot(x, values, color=colors[s.label], linewidth=2, marker="o", markersize=4)
                handles[s.label] = line
            ax.set_xlabel("RL step" if col == 0 else f"{clock} ({unit})")
            ax.set_title(f"{name} ({key}) vs {'step' if col == 0 else clock}", fontsize=10)
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel(name)
    _legend(fig, handles, 4)


def _stacked_bars(ax, series: list[Series], parts: list[dict[str, float]], colors: dict, unit: str) -> dict:
    handles, rows = {}, range(len(series))
    for row, values in zip(rows, parts):
        left = 0.0
        for phase, seconds in values.items():
            handles[phase] = ax.barh(row, seconds, left=left, color=colors[phase], edgecolor="white", height=0.6)
            left += seconds
        ax.text(left, row, f" {left:.2f} {unit}" if left < 10 else f" {left:.0f} {unit}", va="center", fontsize=9)
    ax.set_yticks(list(rows), [s.label for s in series])
    ax.margins(x=0.18)
    ax.grid(axis="x", alpha=0.3)
    return handles


def draw_timing(fig, series: list[Series], run_stage_seconds: dict[str, float | None]) -> None:
    """Left: mean seconds per step by phase. Right: the stage's seconds, with the time outside steps."""
    totals = [s.phase_totals_s() for s in series]
    phases = list(dict.fromkeys(p for t in totals for p in t if p not in ("other", *AFTER_STEP_PHASES)))
    order = [*phases, "other", *AFTER_STEP_PHASES, STARTUP]
    colors = phase_colors(order)
    per_step = [{p: t[p] / max(s.steps, 1) for p in order if p in t} for s, t in zip(series, totals)]
    whole = []
    for s, t in zip(series, totals):
        stage = {p: t[p] for p in order if p in t}
        wall = run_stage_seconds.get(s.label)
        if wall is not None and wall > sum(stage.values()):
            stage[STARTUP] = wall - sum(stage.values())
        whole.append(stage)
    left, right = fig.subplots(1, 2, sharey=True)
    handles = _stacked_bars(left, series, per_step, colors, "s")
    handles.update(_stacked_bars(right, series, whole, colors, "s"))
    left.invert_yaxis()  # the first run on top (the y axis is shared: once inverts both)
    left.set_xlabel("seconds per RL step (mean)")
    left.set_title("one step, by phase (timing/*)", fontsize=10)
    right.set_xlabel("seconds in the stage")
    right.set_title("the whole stage, with start-up and the final save", fontsize=10)
    _legend(fig, {p: handles[p] for p in order if p in handles}, 8)


def draw_selection(fig, series: list[Series], colors: dict, keys: list[str]) -> None:
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    handles = {}
    for ax, key in zip(axes, keys):
        for s in series:
            steps, values = s.values(key)
            if values:
                handles[s.label], = ax.plot(steps, values, color=colors[s.label], linewidth=2,
                                            marker="o" if len(values) < SMOOTH_FROM_STEPS else None, markersize=4)
        ax.set_title(f"{dict(SELECTION_PANELS)[key]} ({key})", fontsize=10)
        ax.set_xlabel("RL step")
        ax.set_ylabel("fraction")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    _legend(fig, handles, 4)


def sections(series: list[Series], stage_seconds: dict[str, float | None]) -> tuple[list[Section], list[str]]:
    """The figures the series have data for, and one note per figure left out."""
    if not series:
        return [], ["No RL stage logged a step: no training curves, timing or selection figures."]
    colors, notes = series_colors(series), []
    legend_rows = (len(series) + 3) // 4
    out = [Section("learning", "Reward and accuracy",
                   f"Per RL stage, against the step and against {time_caption(series)}. Curves of 20 steps "
                   "or more: solid, the trailing mean over a tenth of the steps; faint, each step.",
                   7.0 + 0.3 * legend_rows, lambda fig: draw_learning(fig, series, colors)),
           Section("timing", "Where the time went",
                   "Left: mean seconds per step by phase; 'other' is the part of timing/step no phase covers, "
                   "checkpoint is timed after the step. Right: the same over the whole stage, plus its wall time "
                   "outside the steps (engines and learners starting, the final model saved), from status.json.",
                   1.8 + 0.55 * len(series), lambda fig: draw_timing(fig, series, stage_seconds))]
    keys = [key for key, _ in SELECTION_PANELS if any(s.has(key) for s in series)]
    notes += [f"Not shown: no run logged {key}." for key, _ in SELECTION_PANELS if key not in keys]
    if keys:
        out.append(Section("selection", "Selection and packing",
                           "select/kept_frac: the fraction of completions each step trains on (CPPO, DPPO "
                           "prune). pack/padding_frac: the fraction of padding tokens in the micro-batches.",
                           3.6 + 0.3 * legend_rows, lambda fig: draw_selection(fig, series, colors, keys)))
    return out, notes


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def section_png(section: Section) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_IN, section.height_in), layout="constrained")
    section.draw(fig)
    return _png(fig)


def combined_png(all_sections: list[Section], title: str) -> bytes:
    """Every section in one figure, each under its title."""
    from matplotlib.figure import Figure

    heights = [s.height_in + 0.4 for s in all_sections]
    fig = Figure(figsize=(WIDTH_IN, sum(heights) + 0.5), layout="constrained")
    fig.suptitle(title, fontsize=14, fontweight="bold")
    subfigures = fig.subfigures(len(all_sections), 1, height_ratios=heights, squeeze=False)[:, 0]
    for subfigure, section in zip(subfigures, all_sections):
        subfigure.suptitle(section.title, fontsize=12, fontweight="bold")
        section.draw(subfigure)
    return _png(fig)


def table_section(title: str, table: tuple[list[str], list[list[str]]]) -> Section:
    """A table drawn as a figure, for report.png (the HTML page has it as an HTML table). Long
    headers and cells wrap; columns are as wide as their longest line, scaled to the figure."""
    import textwrap

    headers = [textwrap.fill(h, 14) for h in table[0]]
    rows = [[textwrap.fill(c, 34) for c in row] for row in table[1]]
    lines = [max(c.count("\n") + 1 for c in row) for row in [headers, *rows]]
    line_in = 0.2

    def draw(fig) -> None:
        ax = fig.subplots()
        ax.axis("off")
        drawn = ax.table(cellText=rows, colLabels=headers, cellLoc="left", bbox=[0, 0, 1, 1])
        drawn.auto_set_font_size(False)
        drawn.set_fontsize(8.5)
        widths = [max(len(line) for cell in column for line in cell.split("\n")) + 2
                  for column in zip(headers, *rows)]
        for (row, col), cell in drawn.get_celld().items():
            cell.set_width(widths[col])
            cell.set_height(lines[row] + 0.6)
            cell.set_edgecolor("#cccccc")
            if row == 0:
                cell.set_facecolor("#f0f0f0")

    height = line_in * sum(n + 0.6 for n in lines) + 0.3
    return Section(title.lower().replace(" ", "-"), title, "", height, draw)
