"""`prunerl report RUN_DIR [RUN_DIR ...]` — a finished (or running) run as a report: where the time
went and what each method saved.

Writes `report.html` (self-contained: figures embedded as PNG data URIs, inline CSS, nothing
fetched) and `report.png` (every figure and the summary in one image) to `--out`, by default
`<first run dir>/report/`. Several run dirs are overlaid for comparison, each named by its recipe
(or its folder, when recipe names repeat); each run's time per step is set against the first's.
Figures are drawn on matplotlib Figure objects directly (Agg, no pyplot), so no display is needed
and a caller's pyplot backend is left alone.

Modules: runs.py reads the run dirs, tables.py and figures.py make the tables and matplotlib figures
from them, page.py writes the HTML.
"""
from __future__ import annotations

import sys
import time
from html import escape
from pathlib import Path

EXIT_USAGE = 2


def write_report(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write report.html and report.png for the runs; returns their paths. Raises ReportError."""
    from launch.report import figures, page, tables
    from launch.report.runs import load_runs

    runs = load_runs(run_dirs)
    out = Path(out_dir) if out_dir else runs[0].path / "report"
    series = [s for run in runs for s in run.series]
    stage_seconds = {s.label: run.stage_seconds(s.stage) for run in runs for s in run.series}
    plot_sections, notes = figures.sections(series, stage_seconds)
    summary, stages = tables.summary_table(runs), tables.stage_table(runs)
    evaluation = tables.eval_table(runs)

    title = "prunerl report: " + (" vs ".join(r.label for r in runs) if len(runs) <= 3 else f"{len(runs)} runs")
    meta = (f"Generated {escape(time.strftime('%Y-%m-%d %H:%M:%S'))} from "
            + ", ".join(f"<code>{escape(str(r.path.resolve()))}</code>" for r in runs) + ".")
    blocks = [("Runs", "Per run: wall time from the first stage's start to the last stage's end; training s/step, "
               "the steps' and checkpoints' seconds over the RL steps; eval accuracy, greedy, per evaluated "
               "artifact; tokens saved and padding, the mean over the RL steps.",
               page.html_table(summary, "summary"))]
    for section in plot_sections:
        body = page.image(figures.section_png(section), section.title)
        if section.key == "timing":
            body += page.html_table(tables.phase_table(series), "phases")
        blocks.append((section.title, section.caption, body))
    if notes:
        blocks.append(("Not shown", "", "".join(page.note(n) for n in notes)))
    blocks.append(("Evaluation", "From each eval stage's results.json (evaluation/table.py's columns).",
                   page.html_table(evaluation, "eval") if evaluation else page.note("No eval stage wrote results.")))
    blocks.append(("Stages", "Stage time: from the stage's start on its reserved resources to its end "
                   "(status.json).", page.html_table(stages, "stages")))

    out.mkdir(parents=True, exist_ok=True)
    html_path, png_path = out / "report.html", out / "report.png"
    html_path.write_text(page.page(title, meta, blocks))
    png_sections = [figures.table_section("Runs", summary), *plot_sections]
    if evaluation:
        png_sections.append(figures.table_section("Evaluation", evaluation))
    png_path.write_bytes(figures.combined_png(png_sections, title))
    return html_path, png_path


def cmd_report(args) -> int:
    from launch.report.runs import ReportError

    try:
        html_path, png_path = write_report(args.run_dirs, args.out)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"[prunerl] report: {html_path}")
    print(f"[prunerl] report: {png_path}")
    return 0


def register(sub) -> None:
    report = sub.add_parser("report", help="write an HTML (and PNG) report of one run, or several overlaid")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory (several: compared)")
    report.add_argument("--out", help="folder for report.html and report.png (default: <first RUN_DIR>/report)")
    report.set_defaults(fn=cmd_report)
