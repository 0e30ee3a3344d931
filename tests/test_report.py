"""`prunerl report`: run dirs as the project writes them (the resolved recipe by dump_recipe,
summary.json by launch.cli.write_summary, metrics.jsonl records as rl.tracking.Tracker appends
them), reported through the real CLI, the page rendered by a real headless Chromium.

The run dirs are made here rather than trained (tests/test_e2e.py also reports a trained run): the
metrics, wall seconds included, are chosen so that the report's numbers can be checked exactly.
"""
import base64
import io
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import REPO
from launch.cli import main, write_summary
from launch.config import dump_recipe, load_recipe
from rl.fileio import append_jsonl, write_json_atomic
from rl.metric_keys import ELAPSED

CHROMIUM_BINARIES = ("chromium-headless-shell", "chromium", "chromium-browser")
SHOT_SIZE = (1280, 3000)
TAB10_BLUE, TAB10_ORANGE = (31, 119, 180), (255, 127, 14)  # the first two runs' line colours
ROLLOUT_GREEN = (102, 194, 165)  # the rollout phase's bars (Set2)
T0 = 1_800_000_000.0


def make_recipe(tmp_path: Path, shipped: str, edit=lambda tree: None):
    """A shipped recipe, edited as a YAML tree, loaded and validated like `prunerl run` does."""
    tree = yaml.safe_load((REPO / "recipes" / shipped).read_text())
    edit(tree)
    path = tmp_path / f"edited-{shipped}"
    path.write_text(yaml.safe_dump(tree))
    return load_recipe(path)


def write_status(run_dir: Path, stage: str, kind: str, started: float, finished: float | None, **fields):
    status = {"state": "done" if finished else "running", "kind": kind, "started": started, **fields}
    if finished:
        status["finished"] = finished
    (run_dir / stage).mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / stage / "status.json", status)


def log_steps(run_dir: Path, stage: str, steps: int, step_s: float, train_s: float, selection: dict | None,
              startup_s: float | None = 20.0, checkpoint_every: int = 10, checkpoint_s: float = 0.5):
    """Records shaped like rl/controller.py's: accuracy rising from 0.2, the phases summing to step_s
    (0.05 s of it untimed), a checkpoint's seconds in the record after it, as the controller logs
    them, and the stage's wall seconds (startup_s before the first step; None: a run from before
    rl.tracking logged them)."""
    elapsed = startup_s
    for step in range(1, steps + 1):
        accuracy = 0.2 + 0.4 * step / steps
        metrics = {"reward/mean": accuracy, "reward/accuracy": accuracy, "response/length_mean": 24.0,
                   "train/entropy": 0.1, "train/grad_norm": 0.5,
                   "timing/rollout": step_s - train_s - 0.25, "timing/reward": 0.1, "timing/weight_sync": 0.1,
                   "timing/pack": 0.0, "timing/train": train_s, "timing/step": step_s}
        if step > 1 and (step - 1) % checkpoint_every == 0:
            metrics["timing/checkpoint"] = checkpoint_s
        if startup_s is not None:
            elapsed += step_s + metrics.get("timing/checkpoint", 0.0)
            metrics[ELAPSED] = elapsed
        append_jsonl(run_dir / "metrics.jsonl", {"stage": stage, "step": step, **metrics, **(selection or {})})


def eval_row(path: str, accuracy: float, size_mb: float, sparsity: float) -> dict:
    """A results.json row as evaluation/stage.py writes it."""
    return {"path": path, "engine": "vllm", "engine_note": None, "accuracy": accuracy, "n": 200, "length_mean": 22.4,
            "tokens_per_s": 850.0, "perplexity": 3.21, "perplexity_tokens": 4096, "perplexity_window": 2048,
            "size_bytes": size_mb * 1e6, "bits_per_weight": 32.0, "sparsity": sparsity, "samples": ["#### 7"]}


def write_eval(run_dir: Path, stage: str, results: dict, started: float):
    write_status(run_dir, stage, "eval", started, started + 40,
                 artifact={"accuracy": {name: r["accuracy"] for name, r in results.items()}})
    write_json_atomic(run_dir / stage / "results.json", results)


def grpo_run(tmp_path: Path) -> Path:
    """quickstart: GRPO, 30 steps of 2 s (train 0.9 s), padded micro-batches, one eval stage."""
    run_dir = tmp_path / "grpo-run"
    recipe = make_recipe(tmp_path, "quickstart.yaml", lambda t: t["stages"][0].update(steps=30))
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    write_status(run_dir, "train", "rl", T0, T0 + 100)
    log_steps(run_dir, "train", 30, step_s=2.0, train_s=0.9,
              selection={"select/kept_frac": 1.0, "select/tokens_saved": 0.0, "pack/padding_frac": 0.25})
    write_eval(run_dir, "eval", {"base": eval_row("tiny", 0.22, 1.9, 0.0), "train": eval_row("m", 0.47, 1.9, 0.0)},
               T0 + 100)
    write_summary(recipe, run_dir, {"train": {"steps": 30}}, "succeeded", 150.0)
    return run_dir


def cppo_run(tmp_path: Path) -> Path:
    """cppo_quickstart with a second RL stage `polish` after `train`: 30 + 10 steps of 1 s,
    an eighth of the completions kept, dense packing; the eval stage measures both."""
    def edit(tree):
        train, evaluate = tree["stages"]
        train["steps"] = 30
        polish = {**train, "name": "polish", "needs": ["train"], "steps": 10}
        evaluate.update(needs=["train", "polish"], include_base=False)
        tree["stages"] = [train, polish, evaluate]

    run_dir = tmp_path / "cppo-run"
    recipe = make_recipe(tmp_path, "cppo_quickstart.yaml", edit)
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    selection = {"select/kept_frac": 0.125, "select/tokens_saved": 0.8, "pack/padding_frac": 0.0}
    write_status(run_dir, "train", "rl", T0, T0 + 60)
    log_steps(run_dir, "train", 30, step_s=1.0, train_s=0.3, selection=selection, checkpoint_every=100)
    write_status(run_dir, "polish", "rl", T0 + 60, T0 + 80)
    log_steps(run_dir, "polish", 10, step_s=1.0, train_s=0.3, selection=selection, checkpoint_every=100)
    write_eval(run_dir, "eval", {"train": eval_row("t", 0.51, 1.9, 0.0), "polish": eval_row("p", 0.55, 1.9, 0.0)},
               T0 + 80)
    write_summary(recipe, run_dir, {}, "succeeded", 140.0)
    return run_dir


class Tables(HTMLParser):
    """The page's tables by class: rows of cell texts (the header row first)."""

    def __init__(self, html: str):
        super().__init__()
        self.tables, self._table, self._cell = {}, None, None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._table = self.tables.setdefault(dict(attrs).get("class"), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._table[-1].append(self._cell)
            self._cell = None
        elif tag == "table":
            self._table = None


def data_images(html: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b64)))
            for b64 in re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def report(capsys, *args) -> tuple[int, str, str]:
    code = main(["report", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """The report of the GRPO run against the two-stage CPPO run: (out dir, html)."""
    tmp_path = tmp_path_factory.mktemp("report")
    runs = grpo_run(tmp_path), cppo_run(tmp_path)
    out = tmp_path / "out"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    return out, (out / "report.html").read_text()


def test_the_page_is_self_contained_and_has_every_section(compared):
    out, html = compared
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html), "the page fetches something"
    assert "<script" not in html and "<link" not in html and "url(" not in html
    images = data_images(html)
    assert len(images) == 3  # reward/accuracy, time per phase, selection and packing
    assert all(im.format == "PNG" and im.width == 1200 and im.height > 300 for im in images)
    assert "Not shown" not in html  # every run logged kept_frac and padding
    combined = Image.open(out / "report.png")
    assert combined.width == 1200 and combined.height > sum(im.height for im in images)


def test_the_summary_compares_time_per_step_with_the_first_run(compared):
    tables = Tables(compared[1]).tables
    headers, grpo, cppo = tables["summary"]
    row = dict(zip(headers, grpo)), dict(zip(headers, cppo))
    assert [r["run"] for r in row] == ["quickstart", "cppo_quickstart"]
    assert [r["algorithm"] for r in row] == ["grpo", "cppo"]
    assert [r["RL steps"] for r in row] == ["30", "40"]
    # 30 steps of 2 s and two checkpoints of 0.5 s; 40 steps of 1 s.
    assert [r["training s/step"] for r in row] == ["2.03 s", "1.00 s"]
    assert [r["time per step vs quickstart"] for r in row] == ["1.00× (baseline)", "0.49× (51% less)"]
    assert [r["tokens saved by selection"] for r in row] == ["0.0%", "80.0%"]
    assert [r["padding"] for r in row] == ["25.0%", "0.0%"]
    assert [r["wall time"] for r in row] == ["2 min 20 s", "2 min 00 s"]  # first stage start to last end
    assert row[0]["eval accuracy"] == "base 0.220 · train 0.470"
    assert row[1]["train accuracy (last 10% of steps)"] == "0.587 · 0.600"  # one per RL stage
    assert [r["state"] for r in row] == ["succeeded", "succeeded"]  # from summary.json


def test_the_eval_table_has_a_row_per_run_and_artifact(compared):
    headers, *rows = Tables(compared[1]).tables["eval"]
    assert headers == ["run", "artifact", "accuracy", "perplexity", "size MB", "bits/weight", "sparsity",
                       "tokens/s", "engine"]
    assert [r[:3] for r in rows] == [["quickstart", "base", "0.220"], ["quickstart", "train", "0.470"],
                                     ["cppo_quickstart", "train", "0.510"], ["cppo_quickstart", "polish", "0.550"]]


def test_time_per_phase_names_every_rl_stage(compared):
    headers, *rows = Tables(compared[1]).tables["phases"]
    assert headers == ["RL stage (mean s per step)", "rollout", "reward", "weight_sync", "pack", "train", "other",
                       "checkpoint", "step + checkpoint"]
    by_stage = {r[0]: dict(zip(headers, r)) for r in rows}
    assert list(by_stage) == ["quickstart", "cppo_quickstart/train", "cppo_quickstart/polish"]
    assert by_stage["quickstart"]["train"] == "0.900" and by_stage["quickstart"]["other"] == "0.050"
    assert by_stage["quickstart"]["checkpoint"] == "0.033"  # 2 x 0.5 s over 30 steps
    assert by_stage["cppo_quickstart/polish"]["step + checkpoint"] == "1.000"


def test_figures_name_every_series_and_plot_against_wall_time(tmp_path):
    from matplotlib.figure import Figure

    from launch.report.figures import sections
    from launch.report.runs import load_runs

    runs = load_runs([grpo_run(tmp_path), cppo_run(tmp_path)])
    series = [s for r in runs for s in r.series]
    drawn, notes = sections(series, {s.label: 80.0 for s in series})
    assert [s.key for s in drawn] == ["learning", "timing", "selection"] and notes == []
    for section in drawn:
        fig = Figure(figsize=(12, section.height_in), layout="constrained")
        section.draw(fig)
        legend = [t.get_text() for t in fig.legends[0].texts]
        if section.key == "timing":
            assert legend == ["rollout", "reward", "weight_sync", "pack", "train", "other", "checkpoint",
                              "start-up & save"]
            assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [s.label for s in series]
            assert fig.axes[0].yaxis_inverted() and fig.axes[1].yaxis_inverted()  # the first run on top
        else:
            assert legend == ["quickstart", "cppo_quickstart/train", "cppo_quickstart/polish"]
        if section.key == "learning":
            against_time = fig.axes[1]
            assert against_time.get_xlabel() == "wall time in the stage (s)"
            # time/elapsed_s: 20 s of start-up, then 2 s steps (a checkpoint's 0.5 s after steps 10, 20)
            assert list(against_time.lines[0].get_xdata()[[0, 1, 10, -1]]) == [22.0, 24.0, 42.5, 81.0]


def chromium() -> str | None:
    return next((shutil.which(name) for name in CHROMIUM_BINARIES if shutil.which(name)), None)


def test_the_report_renders_in_a_headless_browser(compared, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no headless Chromium: install Debian's chromium-headless-shell (make test does as root)")
    out, _ = compared
    shot = tmp_path / "screenshot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", f"--window-size={SHOT_SIZE[0]},{SHOT_SIZE[1]}",
                    (out / "report.html").as_uri()], capture_output=True, timeout=120, check=True)
    if os.environ.get("PRUNERL_REPORT_SHOT"):  # a copy to look at
        Path(os.environ["PRUNERL_REPORT_SHOT"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["PRUNERL_REPORT_SHOT"]) / "report.png")
    image = Image.open(shot).convert("RGB")
    assert image.size == SHOT_SIZE
    pixels = np.asarray(image).reshape(-1, 3).astype(int)
    assert (pixels != 255).any(axis=1).mean() > 0.05, "the page rendered blank"
    for colour in (TAB10_BLUE, TAB10_ORANGE, ROLLOUT_GREEN):  # the runs' curves and the phase bars
        close = (np.abs(pixels - colour) <= 30).all(axis=1).sum()
        assert close > 500, f"only {close} pixels of colour {colour}: a plot is missing"


def test_an_eval_only_run_gets_its_table(tmp_path, capsys):
    def edit(tree):
        evaluate = tree["stages"][1]
        evaluate.update(needs=[], include_base=True)
        tree["stages"] = [evaluate]

    run_dir = tmp_path / "eval-only"
    recipe = make_recipe(tmp_path, "quickstart.yaml", edit)
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    write_eval(run_dir, "eval", {"base": eval_row("tiny", 0.22, 1.9, 0.0)}, T0)
    code, out, _ = report(capsys, run_dir)
    assert code == 0 and out.splitlines() == [f"[prunerl] report: {run_dir / 'report' / name}"
                                              for name in ("report.html", "report.png")]
    html = (run_dir / "report" / "report.html").read_text()
    assert data_images(html) == [] and "No RL stage logged a step" in html
    assert Tables(html).tables["eval"][1][:2] == ["base", "0.220"]
    assert Image.open(run_dir / "report" / "report.png").height > 100


def test_a_running_run_without_selection_metrics_says_what_is_not_shown(tmp_path, capsys):
    """A run still going, of a version that logged no wall seconds nor selection metrics."""
    from launch.report.figures import time_axis
    from launch.report.runs import load_runs

    run_dir = tmp_path / "running"
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml")
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    write_status(run_dir, "train", "rl", T0, None)
    log_steps(run_dir, "train", 5, step_s=2.0, train_s=0.9, selection=None, startup_s=None)
    code, _, err = report(capsys, run_dir, "--out", tmp_path / "out")
    assert code == 0, err
    html = (tmp_path / "out" / "report.html").read_text()
    for key in ("select/kept_frac", "pack/padding_frac"):
        assert f"Not shown: no run logged {key}." in html
    assert len(data_images(html)) == 2
    assert "against the step and against training time: the steps&#x27; and checkpoints&#x27; seconds summed" in html
    # With a run that logged wall seconds beside it, both are drawn against training time, to compare.
    both = load_runs([run_dir, grpo_run(tmp_path)])
    assert time_axis([s for r in both for s in r.series]) == ("training time", 1.0, "s")
    summary = dict(zip(*Tables(html).tables["summary"][:2]))
    assert summary["state"] == "running or stopped" and summary["RL steps"] == "5/60"


def test_unusable_run_dirs_are_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    not_started = tmp_path / "not-started"
    not_started.mkdir()
    (not_started / "recipe.yaml").write_text(dump_recipe(load_recipe(REPO / "recipes" / "quickstart.yaml")))
    for run_dir, message in ((tmp_path / "missing", "no such run directory"),
                             (empty, "no recipe.yaml, so not a prunerl run directory"),
                             (not_started, "nothing to report yet")):
        code, out, err = report(capsys, run_dir)
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and err.startswith(f"error: {run_dir}: {message}"), err
    assert not (empty / "report").exists()

