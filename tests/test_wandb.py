"""W&B logging read back from real offline runs (wandb's own reader, tests/_wandb_offline.py): a
stage's run (resolved recipe as config, group, job type, stable id), its history with the wall
clock across a resume, the eval tables, the model artifact reference, and the saved layout.
(A whole RL run's history against the layout: tests/test_e2e.py.)"""
import base64
import hashlib
import json
import time

import pytest

from _wandb_offline import read_offline_runs
from conftest import REPO, TINY_POLICY
from evaluation.table import COMPLETION_COLUMNS, COMPLETION_SAMPLES, COMPLETIONS_KEY, TABLE_KEY, completion_rows
from evaluation.table import log_wandb_table
from launch.cli import main
from launch.config import load_recipe
from launch.wandb_layout import (EVAL_TABLES, SECTION_METRICS, STACKED_PHASES, TRUNCATION_METRICS, build_workspace,
                                 referenced_metrics, referenced_tables)
from rl.metric_keys import ELAPSED, SECTIONS
from rl.tracking import Tracker, log_model_reference, run_config


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")


@pytest.fixture
def recipe():
    # The shipped recipe leaves most fields to their defaults; one override, to see it in the config.
    return load_recipe(REPO / "recipes" / "cppo_quickstart.yaml", ["stages.train.steps=3"])


def step_metrics(step: int) -> dict:
    return {"reward/mean": 0.1 * step, "reward/accuracy": 0.05 * step, "timing/step": 1.5, "timing/train": 1.0,
            "select/kept_frac": 0.125}


def md5_b64(path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def test_stage_run_holds_the_resolved_recipe_in_the_recipe_group_with_the_kind_as_job_type(tmp_path, recipe):
    run_dir = tmp_path / "cppo-run"
    tracker = Tracker(run_dir, recipe, "train", total_steps=3, progress=False)
    for step in (1, 2):
        tracker.log(step, step_metrics(step))
    tracker.close()

    [session] = read_offline_runs(run_dir)["cppo-run/train"]
    assert session.run["run_group"] == "cppo_quickstart" and session.run["job_type"] == "rl"
    assert session.run["run_id"] == "cppo-run-train"
    stage = next(s for s in recipe.stages if s.name == "train")
    assert session.config == json.loads(json.dumps(run_config(recipe, stage)))
    # Resolved: the override, the algorithm's preset and defaults the YAML never names.
    assert session.config["stages"][0]["steps"] == 3
    assert session.config["stage"]["kind"] == "rl" and session.config["stage"]["algorithm"] == "cppo"
    assert session.config["stage"]["selection"]["completions"]["rate"] == 0.875
    assert session.config["stage"]["loss"]["mismatch"]["c_max"] == 3.0 and "c_max" not in (
        REPO / "recipes" / "cppo_quickstart.yaml").read_text()
    assert session.config["cluster"]["max_restarts"] == recipe.cluster.max_restarts
    assert [row["_step"] for row in session.history] == [1, 2]
    assert [row["reward/mean"] for row in session.history] == [0.1, 0.2]
    assert session.history_keys() == {*step_metrics(1), ELAPSED}
    assert session.exit_code == 0


def test_wall_clock_goes_on_across_a_resume_without_the_time_the_run_was_down(tmp_path, recipe):
    run_dir = tmp_path / "run"
    first = Tracker(run_dir, recipe, "train", total_steps=3, progress=False)
    for step in (1, 2):
        time.sleep(0.05)
        first.log(step, step_metrics(step))
    first.close()
    at_checkpoint = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])[ELAPSED]
    time.sleep(1.0)  # the run is down

    started = time.time()
    resumed = Tracker(run_dir, recipe, "train", total_steps=3, start_step=1, progress=False)  # from step 1
    for step in (2, 3):
        resumed.log(step, step_metrics(step))
    resumed.close()
    attempt = time.time() - started

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    elapsed = [r[ELAPSED] for r in records]
    assert elapsed == sorted(elapsed) and at_checkpoint < elapsed[1] <= at_checkpoint + attempt
    # Offline, the resumed attempt is a second session of the same run id; W&B's history matches.
    sessions = read_offline_runs(run_dir)["run/train"]
    assert len(sessions) == 2 and {s.run["run_id"] for s in sessions} == {"run-train"}
    assert [(row["_step"], row[ELAPSED]) for row in sessions[1].history] == [(r["step"], r[ELAPSED])
                                                                           for r in records[1:]]


def test_eval_tables_hold_the_comparison_and_a_bounded_sample_of_completions(tmp_path, recipe):
    results = {"base": {"accuracy": 0.25, "perplexity": 9.5, "size_bytes": 2_000_000, "bits_per_weight": 32.0,
                        "sparsity": 0.0, "tokens_per_s": 100.0, "engine": "vllm"},
               "train": {"accuracy": 0.5, "perplexity": 8.0, "size_bytes": 2_000_000, "bits_per_weight": 32.0,
                         "sparsity": 0.0, "tokens_per_s": 90.0, "engine": "transformers"}}
    n = COMPLETION_SAMPLES + 4
    prompts = [f"Question: {i} + 1?\nAnswer:" for i in range(n)]
    rows = []
    for artifact in results:
        texts = [f"{i + 1} #### {i + 1}" for i in range(n)]
        rows += completion_rows(artifact, prompts, texts, [str(i + 1) for i in range(n)], [True] * n, [5] * n)
    run_dir = tmp_path / "run"
    log_wandb_table(recipe, run_dir, "eval", results, rows)

    [session] = read_offline_runs(run_dir)["run/eval"]
    assert session.run["job_type"] == "eval" and session.run["run_group"] == "cppo_quickstart"
    table = session.table(TABLE_KEY)
    assert table["columns"][:2] == ["artifact", "accuracy"]
    assert [row[:2] for row in table["data"]] == [["base", 0.25], ["train", 0.5]]
    completions = session.table(COMPLETIONS_KEY)
    assert completions["columns"] == COMPLETION_COLUMNS
    assert len(completions["data"]) == 2 * COMPLETION_SAMPLES
    assert completions["data"][0] == ["base", prompts[0], "1 #### 1", "1", True, 5]
    assert [r[0] for r in completions["data"]].count("train") == COMPLETION_SAMPLES
    assert session.summary[f"{COMPLETIONS_KEY}.nrows"] == 2 * COMPLETION_SAMPLES


def test_a_stage_model_is_an_artifact_of_file_references_with_checksums_nothing_uploaded(tmp_path, recipe):
    run_dir = tmp_path / "run"
    log_model_reference(recipe, run_dir, "train", {"model": str(TINY_POLICY), "steps": 3, "rollouts": None})

    [session] = read_offline_runs(run_dir)["run/train"]
    [artifact] = session.artifacts
    assert artifact["type"] == "model" and artifact["name"] == "cppo_quickstart-train"
    files = sorted(p for p in TINY_POLICY.rglob("*") if p.is_file())
    entries = {e["path"]: e for e in artifact["manifest"]["contents"]}
    assert sorted(entries) == [str(p.relative_to(TINY_POLICY)) for p in files]
    for path in files:
        entry = entries[str(path.relative_to(TINY_POLICY))]
        assert entry["ref"] == path.resolve().as_uri() and entry["digest"] == md5_b64(path)
        assert "local_path" not in entry  # a reference: no staged copy to upload
    metadata = json.loads(artifact["metadata"])
    assert metadata["path"] == str(TINY_POLICY.resolve()) and metadata["steps"] == 3 and "rollouts" not in metadata


def test_no_model_no_run_and_a_missing_model_folder_is_reported_not_raised(tmp_path, recipe):
    run_dir = tmp_path / "run"
    log_model_reference(recipe, run_dir, "eval", {"results": "x.json"})
    assert not (run_dir / "wandb").exists()
    said = []
    log_model_reference(recipe, run_dir, "train", {"model": str(tmp_path / "gone")}, log=said.append)
    assert len(said) == 1 and "model reference was not logged" in said[0] and "gone" in said[0]


def test_layout_sections_match_the_metric_sections_and_the_eval_tables():
    workspace = build_workspace("entity", "project")
    names = [s.name for s in workspace.sections]
    assert names == ["speedup", *SECTIONS, "eval"]
    for key in referenced_metrics(workspace):
        assert key.split("/")[0] in (*SECTIONS, "time"), key
    assert set(SECTION_METRICS) == set(SECTIONS)
    assert referenced_metrics(workspace) >= {*(k for keys in SECTION_METRICS.values() for k in keys),
                                             *TRUNCATION_METRICS, ELAPSED}
    assert referenced_tables(workspace) == set(EVAL_TABLES) == {TABLE_KEY, COMPLETIONS_KEY}
    timing = next(s for s in workspace.sections if s.name == "timing")
    stacked = [p for p in timing.panels if getattr(p, "plot_type", None) == "stacked-area"]
    assert len(stacked) == 1 and stacked[0].y == list(STACKED_PHASES)
    speedup = next(s for s in workspace.sections if s.name == "speedup")
    assert {tuple(p.y) for p in speedup.panels if getattr(p, "x", None) == ELAPSED} == {("reward/mean",),
                                                                                      ("reward/accuracy",)}
    assert [g.name for g in workspace.runset_settings.groupby] == ["Group"]


def test_wandb_layout_prints_the_view_and_save_without_a_key_fails_in_one_line(tmp_path, monkeypatch, capsys):
    assert main(["wandb-layout", "--entity", "me", "--project", "prunerl"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert view["entity"] == "me" and view["project"] == "prunerl"
    sections = view["spec"]["section"]["panelBankConfig"]["sections"]
    plotted = {m for s in sections for p in s["panels"] for m in p["config"].get("metrics", [])}
    assert plotted >= {"reward/mean", "timing/train", "select/tokens_saved"}
    assert any(p["config"].get("xAxis") == ELAPSED for s in sections for p in s["panels"])

    # No key anywhere W&B looks, and no W&B server to reach if one were found.
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    assert main(["wandb-layout", "--entity", "me", "--project", "prunerl", "--save"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not saved" in err and "API key" in err
