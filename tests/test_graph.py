"""The job graph through the real CLI: concurrency of independent stages, lineage, failures."""
import json
import subprocess
import sys

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow


def recipe_with(tmp_path, stages: list[dict]) -> str:
    tree = yaml.safe_load((REPO / "tests" / "recipes" / "tiny_rl.yaml").read_text())
    tree["stages"] = stages
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def run(recipe: str, run_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", "run", recipe, "--run-dir", str(run_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def status(run_dir, stage) -> dict:
    return json.loads((run_dir / stage / "status.json").read_text())


def test_independent_stages_overlap_and_record_lineage(tmp_path):
    evaluate = {"kind": "eval", "limit": 4, "max_new_tokens": 8}
    run_dir = tmp_path / "run"
    out = run(recipe_with(tmp_path, [{"name": "eval_a", **evaluate}, {"name": "eval_b", **evaluate}]), run_dir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    a, b = status(run_dir, "eval_a"), status(run_dir, "eval_b")
    assert a["state"] == b["state"] == "done"
    assert a["started"] < b["finished"] and b["started"] < a["finished"], "independent stages ran one after another"
    assert a["artifact"]["accuracy"] == b["artifact"]["accuracy"], "same model, same greedy decoding"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval"] == {"eval_a": a["artifact"]["accuracy"], "eval_b": b["artifact"]["accuracy"]}


def test_failed_stage_stops_its_dependents(tmp_path):
    run_dir = tmp_path / "run"
    stages = [{"name": "broken", "kind": "eval", "include_base": False},  # nothing to evaluate: fails
              {"name": "after", "kind": "eval", "needs": ["broken"]}]
    out = run(recipe_with(tmp_path, stages), run_dir)
    assert out.returncode == 1
    assert "stage 'broken' failed" in out.stderr and "no model to evaluate" in out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    broken = status(run_dir, "broken")
    assert broken["state"] == "failed" and "no model to evaluate" in broken["error"]
    assert not (run_dir / "after").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"] == "failed" and summary["stages"] == {"broken": "failed", "after": "not started"}
