"""End to end through the real CLI: quickstart, kill-and-resume, and Ray Jobs submission."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO

pytestmark = pytest.mark.slow
PRUNERL = [sys.executable, "-m", "launch"]
REQUIRED_METRICS = ["reward/mean", "reward/std", "reward/accuracy", "reward/gsm8k_accuracy",
                    "response/length_mean", "response/truncated_frac", "loss/total", "loss/policy", "loss/kl",
                    "train/clip_frac", "train/entropy", "train/grad_norm", "train/lr", "select/kept_frac",
                    "select/tokens_saved", "select/prompts_skipped", "pack/padding_frac", "timing/rollout", "timing/train",
                    "timing/weight_sync", "timing/step", "perf/tokens_per_s", "rollout/mismatch_kl"]


def run_cli(*args, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*PRUNERL, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, **kwargs)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_quickstart_short(tmp_path):
    run_dir = tmp_path / "run"
    out = run_cli("run", "recipes/quickstart.yaml", "stages.train.steps=3", "stages.train.checkpoint.every_steps=2",
                  "stages.eval.limit=16", "--run-dir", str(run_dir))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "step    3/3" in out.stdout and "Traceback" not in out.stdout

    assert (run_dir / "recipe.yaml").read_text().startswith("name: quickstart")
    metrics = records(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        for key in REQUIRED_METRICS:
            assert math.isfinite(m[key]), (key, m[key])
        assert m["train/grad_norm"] > 0 and m["train/tokens"] > 0
    ckpts = run_dir / "checkpoints" / "train"
    assert (ckpts / "latest").read_text() == "step_000003"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_000002", "step_000003"]
    for folder in (ckpts / "step_000003" / "hf", run_dir / "train" / "model"):
        assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert set(results) == {"base", "train"} and all(r["n"] == 16 for r in results.values())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"] == "succeeded" and summary["stages"] == {"train": "done", "eval": "done"}
    assert summary["eval"]["eval"] == {k: r["accuracy"] for k, r in results.items()}
    check_wandb_runs(run_dir, results)

    # Resubmitting a finished run skips every stage.
    again = run_cli("run", "recipes/quickstart.yaml", "stages.train.steps=3", "stages.train.checkpoint.every_steps=2",
                    "stages.eval.limit=16", "--run-dir", str(run_dir), "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "stage 'train' already done" in again.stdout and "stage 'eval' already done" in again.stdout

    # The run's report (tests/test_report.py checks it in depth): its figures and its eval table.
    report = run_cli("report", str(run_dir))
    assert report.returncode == 0, report.stderr[-2000:]
    html = (run_dir / "report" / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 3, "a figure is missing"
    for artifact, r in results.items():
        assert f'<tr><td>{artifact}</td><td class="num">{r["accuracy"]:.3f}</td>' in html
    assert (run_dir / "report" / "report.png").stat().st_size > 50_000


def check_wandb_runs(run_dir: Path, results: dict) -> None:
    """The quickstart's offline W&B runs, read back: every key the saved layout plots is one the RL
    run logged (Step-GRPO's are checked in test_step_grpo_composes...), the eval tables, and the
    trained model as a reference artifact."""
    from _wandb_offline import read_offline_runs
    from evaluation.table import COMPLETION_SAMPLES
    from launch.wandb_layout import TRUNCATION_METRICS, build_workspace, referenced_metrics, referenced_tables
    from rl.metric_keys import ELAPSED, SECTIONS

    runs = read_offline_runs(run_dir)
    train, evaluation = runs[f"{run_dir.name}/train"], runs[f"{run_dir.name}/eval"]
    assert [s.run["job_type"] for s in train + evaluation] == ["rl", "rl", "eval"]  # the model reference: a session
    assert {s.run["run_group"] for s in train + evaluation} == {"quickstart"}
    assert train[0].config["stage"]["steps"] == 3 and train[0].config["stages"][1]["limit"] == 16
    assert [row["_step"] for row in train[0].history] == [1, 2, 3]
    logged = train[0].history_keys()
    assert {key.split("/")[0] for key in logged} <= {*SECTIONS, "time"}, logged
    elapsed = [row[ELAPSED] for row in train[0].history]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    workspace = build_workspace("entity", "project")
    assert referenced_metrics(workspace) - set(TRUNCATION_METRICS) <= logged, \
        referenced_metrics(workspace) - set(TRUNCATION_METRICS) - logged
    for key in referenced_tables(workspace):
        assert evaluation[0].table(key)["data"], key
    table = evaluation[0].table("eval/table")
    assert {row[0]: row[1] for row in table["data"]} == {name: r["accuracy"] for name, r in results.items()}
    completions = evaluation[0].table("eval/completions")["data"]
    sampled = min(COMPLETION_SAMPLES, 16)  # stages.eval.limit=16
    assert [row[0] for row in completions] == ["base"] * sampled + ["train"] * sampled
    [model] = train[1].artifacts
    weights = (run_dir / "train" / "model" / "model.safetensors").resolve().as_uri()
    assert model["type"] == "model" and weights in {e["ref"] for e in model["manifest"]["contents"]}


def test_cppo_quickstart_trains_the_largest_advantages(tmp_path):
    run_dir = tmp_path / "cppo"
    out = run_cli("run", "recipes/cppo_quickstart.yaml", "stages.train.steps=2", "stages.eval.include_base=false",
                  "stages.eval.limit=8", "--run-dir", str(run_dir))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for m in records(run_dir / "metrics.jsonl"):
        # 16 prompts x G 8 = 128 completions; P = 0.875 drops floor(112) of them.
        assert m["train/rows"] == 16 and m["select/kept_frac"] == 0.125
        assert 0.5 < m["select/tokens_saved"] < 1 and m["train/grad_norm"] > 0


# DPPO with a 16-prompt train split (2 steps per epoch), so that steps 3 and 4 prune prompts from the
# history of steps 1 and 2, which the resumed run must read back from the checkpoint.
DPPO_RESUME = ["stages.train.algorithm=dppo", "data.train.limit=16", "stages.train.selection.prompts.rate=0.7"]


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    recipe = "tests/recipes/tiny_rl.yaml"
    straight = tmp_path / "straight"
    out = run_cli("run", recipe, *DPPO_RESUME, "--run-dir", str(straight))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen([*PRUNERL, "run", recipe, *DPPO_RESUME, "--run-dir", str(crashed)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = crashed / "checkpoints" / "train" / "latest"
    deadline = time.time() + 400
    while not (latest.exists() and latest.read_text() == "step_000002"):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((crashed / "train" / "status.json").read_text())["state"] == "running"

    resumed = run_cli("run", recipe, *DPPO_RESUME, "--run-dir", str(crashed), "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "(step 2)" in resumed.stdout

    def order(run):
        return [(r["step"], r["prompts"], r["generated"]) for r in records(run / "train" / "batches.jsonl")]
    assert [m["step"] for m in records(crashed / "metrics.jsonl")] == [1, 2, 3, 4]
    assert order(crashed) == order(straight)
    samples = lambda run: [(r["step"], r["prompt_ids"]) for r in records(run / "train" / "rollouts.jsonl")]  # noqa: E731
    assert sorted({s for s, _ in samples(crashed)}) == [1, 2, 3, 4] and len(samples(crashed)) <= 4 * 4
    assert samples(crashed) == samples(straight), "the resumed run's calibration samples differ"
    skipped = [m["select/prompts_skipped"] for m in records(straight / "metrics.jsonl")]
    assert skipped[:2] == [0, 0] and sum(skipped[2:]) > 0, skipped  # only prompts with history are pruned
    lrs = lambda run: [m["train/lr"] for m in records(run / "metrics.jsonl")]  # noqa: E731
    assert lrs(crashed) == pytest.approx(lrs(straight)), "scheduler state was not restored"


def test_async_two_engines_learns_and_resumes_in_data_order(tmp_path):
    """One-step-off rollouts on two engines: every sample is one version old (step 1's none), the
    loss stays finite, training accuracy rises, a kill after a checkpoint resumes with the same data
    order as the seed fixes, and no process of the run is left afterwards."""
    from rl.data import PromptSampler, load_rows
    from launch.schema import DataSource

    run_dir, tag = tmp_path / "run", f"async-{os.getpid()}"
    args = ["run", "recipes/quickstart.yaml", "stages.train.steps=24", "stages.train.rollout.async=true",
            "stages.train.rollout.engines=2", "stages.train.checkpoint.every_steps=8",
            "stages.eval.include_base=false", "stages.eval.limit=16", "--run-dir", str(run_dir)]
    env = {**os.environ, "PRUNERL_E2E_TAG": tag}
    proc = subprocess.Popen([*PRUNERL, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    latest = run_dir / "checkpoints" / "train" / "latest"
    deadline = time.time() + 400
    while not (latest.exists() and latest.read_text() == "step_000008"):
        assert proc.poll() is None and time.time() < deadline, "no first checkpoint"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = run_cli(*args, "--resume", env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "(step 8)" in resumed.stdout

    metrics = records(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 25))
    assert all(math.isfinite(m["loss/total"]) and m["train/grad_norm"] > 0 for m in metrics)
    # Step 1 of each run (the first and the resumed one) is generated on the learner's weights.
    assert [m["rollout/staleness"] for m in metrics] == [0] + [1] * 7 + [0] + [1] * 15
    sampler = PromptSampler(len(load_rows(DataSource(path=str(REPO / "recipes/assets/synth_gsm8k/train.jsonl")))), 42)
    assert [b["prompts"] for b in records(run_dir / "train" / "batches.jsonl")] == [sampler.next(16) for _ in range(24)]
    accuracy = [m["reward/accuracy"] for m in metrics]
    assert sum(accuracy[-6:]) / 6 > sum(accuracy[:6]) / 6 + 0.05, accuracy
    def leftovers() -> list[str]:
        left = []
        for p in psutil.process_iter():
            try:
                if p.environ().get("PRUNERL_E2E_TAG") == tag:
                    left.append(f"{p.pid} {p.name()}")
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return left
    deadline = time.time() + 20
    while leftovers() and time.time() < deadline:
        time.sleep(1)
    assert leftovers() == []


STEP_GRPO_METRICS = ["response/steps_mean", "rollout/exit_early_exit", "rollout/exit_natural", "rollout/exit_budget",
                     "rollout/exit_repetition", "rollout/probes_mean", "rollout/inserted_frac", "reward/boxed_accuracy",
                     "reward/boxed_format"]


@pytest.mark.parametrize("selection", [
    ["stages.train.algorithm=cppo", "stages.train.selection.completions.rate=0.5"],
    ["stages.train.algorithm=dppo", "data.train.limit=32", "stages.train.rollout.async=true"],
], ids=["cppo", "dppo-async"])
def test_step_grpo_composes_with_selection_and_packing(tmp_path, selection):
    """Truncated rollouts and the step-aware reward on the testbed policy, under CPPO and under
    DPPO (with one-step-off rollouts), with dense packing: the run trains and reports how its
    rollouts ended; the eval stage decodes plainly and keeps every completion."""
    run_dir = tmp_path / "run"
    out = run_cli("run", "recipes/step_grpo_quickstart.yaml", "stages.train.steps=3", *selection,
                  "stages.eval.include_base=false", "stages.eval.limit=8", "--run-dir", str(run_dir))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    metrics = records(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        for key in STEP_GRPO_METRICS:
            assert math.isfinite(m[key]), (key, m[key])
        assert sum(m[f"rollout/exit_{r}"] for r in ("early_exit", "natural", "budget", "repetition")) == pytest.approx(1)
        assert m["train/grad_norm"] > 0 and m["pack/padding_frac"] == 0
        assert 0 < m["rollout/inserted_frac"] < 0.5
    if "cppo" in selection[0]:
        assert all(m["select/kept_frac"] == 0.5 for m in metrics)
    completions = records(run_dir / "eval" / "completions-train.jsonl")
    assert len(completions) == 8 and all("</think>" in c["text"] for c in completions)
    from _wandb_offline import read_offline_runs
    from launch.wandb_layout import TRUNCATION_METRICS
    logged = read_offline_runs(run_dir)[f"{run_dir.name}/train"][0].history_keys()
    assert set(TRUNCATION_METRICS) <= logged, set(TRUNCATION_METRICS) - logged  # the layout's Step-GRPO panels


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 in its own temp dir; stopped by killing only its own processes."""
    temp_dir = Path("/tmp") / f"prt{os.getpid()}"  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    dash = free_port()
    subprocess.run([Path(sys.executable).parent / "ray", "start", "--head", f"--port={free_port()}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4",
                    "--disable-usage-stats", f"--temp-dir={temp_dir}"], env=env, check=True,
                   capture_output=True, timeout=120)
    yield f"http://127.0.0.1:{dash}", env
    for p in psutil.process_iter(["cmdline"]):
        if any(str(temp_dir) in part for part in (p.info["cmdline"] or [])):
            p.kill()


def test_compress_recipe_runs_both_branches_and_writes_the_table(tmp_path):
    """recipes/compress_quickstart.yaml, shortened: RL, then sparsify -> recover -> quantize beside
    quantize_dense and binarize, then one eval table with a row per artifact."""
    run_dir = tmp_path / "run"
    out = run_cli("run", "recipes/compress_quickstart.yaml", "stages.train.steps=2", "stages.recover.steps=2",
                  "stages.eval.limit=8", "stages.eval.max_new_tokens=32", "--run-dir", str(run_dir))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    artifacts = ["base", "train", "sparsify", "recover", "quantize", "quantize_dense", "binarize"]
    assert list(results) == artifacts
    table = (run_dir / "eval" / "table.md").read_text().splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == artifacts
    assert results["sparsify"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert results["recover"]["sparsity"] >= 0.5 and results["quantize"]["sparsity"] >= 0.5  # masks kept
    assert 4 < results["quantize"]["bits_per_weight"] < 5 and results["base"]["bits_per_weight"] == 32
    assert results["binarize"]["bits_per_weight"] < 4
    assert results["quantize"]["size_bytes"] < 0.3 * results["base"]["size_bytes"]
    stage = {s: json.loads((run_dir / s / "status.json").read_text()) for s in artifacts[1:]}
    assert all(s["state"] == "done" for s in stage.values())
    overlap = lambda a, b: a["started"] < b["finished"] and b["started"] < a["finished"]  # noqa: E731
    assert any(overlap(stage[side], stage[main]) for side in ("quantize_dense", "binarize")
               for main in ("sparsify", "recover", "quantize")), "the independent branches ran one after another"
    assert len(records(run_dir / "train" / "rollouts.jsonl")) == 2 * 4  # the calibration samples
    assert "rollouts" in json.loads((run_dir / "sparsify" / "stage.json").read_text())["calibration_origin"]


def test_submit_with_ray_job_submit_and_prunerl_submit(ray_head, tmp_path):
    address, env = ray_head
    by_ray = tmp_path / "by_ray"
    out = subprocess.run([Path(sys.executable).parent / "ray", "job", "submit", "--address", address,
                          "--working-dir", ".", "--", "tests/recipes/tiny_rl.yaml", "stages.train.steps=2",
                          "--run-dir", str(by_ray)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout and "step    2/2" in out.stdout
    assert [m["step"] for m in records(by_ray / "metrics.jsonl")] == [1, 2]

    by_cli = tmp_path / "by_cli"
    out = run_cli("submit", "tests/recipes/tiny_rl.yaml", "stages.train.steps=2", "--address", address,
                  "--run-dir", str(by_cli), env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "SUCCEEDED" in out.stdout
    assert [m["step"] for m in records(by_cli / "metrics.jsonl")] == [1, 2]
