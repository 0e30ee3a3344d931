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


SPARSIFY = {"kind": "sparsify", "sparsity": 0.5, "calibration": {"samples": 4, "max_tokens": 32}}


def test_a_stage_waits_visibly_for_resources_another_holds(tmp_path):
    run_dir = tmp_path / "run"  # each stage reserves 3 of the cluster's 4 CPUs: they cannot overlap
    out = run(recipe_with(tmp_path, [{"name": "a", **SPARSIFY, "num_cpus": 3}, {"name": "b", **SPARSIFY, "num_cpus": 3}]),
              run_dir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    first, second = sorted(["a", "b"], key=lambda s: status(run_dir, s)["started"])
    assert f"stage '{second}' waiting for resources: needs 3 CPU" in out.stdout
    assert f"stage '{second}' has its resources" in out.stdout
    work = json.loads((run_dir / first / "stage.json").read_text())["wall_time_s"]
    assert status(run_dir, second)["started"] >= status(run_dir, first)["started"] + work


def test_resubmission_reruns_exactly_what_changed(tmp_path):
    run_dir = tmp_path / "run"

    def submit(prune: float, more: float) -> tuple[str, dict]:
        stages = [{"name": "prune", **SPARSIFY, "sparsity": prune},
                  {"name": "more", **SPARSIFY, "sparsity": more, "needs": ["prune"]}]
        out = run(recipe_with(tmp_path, stages), run_dir)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout, {s: status(run_dir, s)["artifact"]["version"] for s in ("prune", "more")}

    def skipped(stdout: str, stage: str) -> bool:
        return f"stage '{stage}' already done with the same config and inputs, skipping" in stdout

    _, v1 = submit(0.5, 0.6)
    stdout, v2 = submit(0.5, 0.6)  # unchanged: nothing runs
    assert skipped(stdout, "prune") and skipped(stdout, "more") and v2 == v1
    stdout, v3 = submit(0.5, 0.7)  # only the downstream stage changed
    assert skipped(stdout, "prune") and "stage 'more': its config or inputs changed" in stdout
    assert v3["prune"] == v1["prune"] and v3["more"] != v1["more"]
    assert status(run_dir, "more")["lineage"]["inputs"] == {"prune": v1["prune"]}
    stdout, v4 = submit(0.4, 0.7)  # the upstream stage changed: what depends on it runs again too
    assert not skipped(stdout, "prune") and not skipped(stdout, "more")
    assert v4["prune"] != v3["prune"] and v4["more"] != v3["more"]
    assert status(run_dir, "more")["lineage"]["inputs"] == {"prune": v4["prune"]}
    sparsity = json.loads((run_dir / "prune" / "stage.json").read_text())["sparsity"]
    assert sparsity == pytest.approx(0.4, abs=0.01)


def test_finish_policy_lets_independent_branches_complete(tmp_path):
    run_dir = tmp_path / "run"
    stages = [{"name": "broken", "kind": "eval", "include_base": False},  # nothing to evaluate: fails
              {"name": "after", "kind": "eval", "needs": ["broken"]},
              {"name": "sibling", **SPARSIFY}]
    recipe = recipe_with(tmp_path, stages)
    out = subprocess.run([sys.executable, "-m", "launch", "run", recipe, "cluster.on_stage_failure=finish",
                          "--run-dir", str(run_dir)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1
    assert "stage 'broken' failed" in out.stderr and "independent stages go on" in out.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"] == "failed"
    assert summary["stages"] == {"broken": "failed", "after": "skipped", "sibling": "done"}
    assert "did not finish: broken" in status(run_dir, "after")["error"]
