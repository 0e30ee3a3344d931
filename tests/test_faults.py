"""Fault injection through the real CLI: processes killed, stopped or signalled mid-run.

Each run either completes with contiguous, non-duplicated steps in the prompt order the seed fixes,
or fails with a clear message within a deadline; and when it is over no process of it is left.
Run alone with `pytest -m faults`.
"""
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.faults]
PRUNERL = [sys.executable, "-m", "launch", "run", "tests/recipes/tiny_rl.yaml"]
TAG = "PRUNERL_FAULT_TEST"  # an environment variable every process of a run inherits


class Run:
    """`prunerl run` in its own session, its processes found by an environment tag."""

    def __init__(self, run_dir: Path, *overrides: str, resume: bool = False):
        self.run_dir, self.tag = run_dir, uuid.uuid4().hex
        args = [*PRUNERL, *overrides, "--run-dir", str(run_dir), *(["--resume"] if resume else [])]
        self.log = (run_dir.parent / f"{run_dir.name}-{self.tag[:6]}.log").open("w")
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, TAG: self.tag}, start_new_session=True)

    def processes(self, name: str = "") -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["name", "cmdline"]):
            try:
                if p.environ().get(TAG) == self.tag and name in " ".join([p.info["name"] or "", *(p.info["cmdline"] or [])]):
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def wait_for(self, condition, what: str, timeout: float = 400, poll_s: float = 0.2):
        deadline = time.time() + timeout
        while not condition():
            assert self.proc.poll() is None, f"the run ended before {what}:\n{self.output()[-3000:]}"
            assert time.time() < deadline, f"no {what} within {timeout}s:\n{self.output()[-3000:]}"
            time.sleep(poll_s)

    def wait_step(self, step: int):
        self.wait_for(lambda: step in steps(self.run_dir), f"step {step}")

    def kill(self, name: str) -> int:
        victims = self.processes(name)
        assert victims, f"no process '{name}' in the run"
        victims[0].kill()
        return victims[0].pid

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        self.log.close()
        return code, self.output()

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text()

    def time_until(self, text: str, since: float, timeout: float = 300) -> float:
        """Seconds from `since` until `text` appears in the run's output (printed for the record)."""
        self.wait_for(lambda: text in self.output(), repr(text), timeout)
        elapsed = time.time() - since
        print(f"[fault timing] {text!r} after {elapsed:.1f}s")
        return elapsed

    def leftovers(self, grace_s: float = 20) -> list[str]:
        deadline = time.time() + grace_s
        while (left := self.processes()) and time.time() < deadline:
            time.sleep(1)
        return [f"{p.pid} {p.name()}" for p in left]


def steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            pass  # a line being written
    return out


def expected_order(num_steps: int, prompts_per_step: int = 8, seed: int = 7) -> list[list[int]]:
    """The prompts each step draws: fixed by the seed (tiny_rl.yaml), whatever was killed."""
    from rl.data import PromptSampler, load_rows
    from launch.schema import DataSource

    sampler = PromptSampler(len(load_rows(DataSource(path=str(REPO / "recipes/assets/synth_gsm8k/train.jsonl")))), seed)
    return [sampler.next(prompts_per_step) for _ in range(num_steps)]


def final_states(run_dir: Path) -> tuple[str, str]:
    """(the run's state, the train stage's state) from summary.json."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary["state"], summary["stages"]["train"]


def assert_completed(run: Run, code: int, out: str, num_steps: int = 4):
    assert code == 0, out[-4000:]
    assert steps(run.run_dir) == list(range(1, num_steps + 1)), out[-2000:]
    batches = [json.loads(line) for line in (run.run_dir / "train" / "batches.jsonl").read_text().splitlines()]
    assert [b["prompts"] for b in batches] == expected_order(num_steps)
    assert final_states(run.run_dir) == ("succeeded", "done")
    assert "Traceback" not in out
    assert run.leftovers() == []


def test_rollout_engine_and_reward_worker_deaths_are_repaired_in_place(tmp_path):
    """kill -9 of a rollout actor (its vLLM engine runs inside it on CPU), then of a reward
    worker: each is replaced and the run completes."""
    run = Run(tmp_path / "run", "cluster.max_restarts=2", "cluster.liveness.probe_interval_s=1")
    run.wait_step(1)
    run.kill("ray::RolloutWorker")
    run.time_until("replacing rollout engine 0", time.time())
    run.wait_step(3)
    reward_workers = [p for p in run.processes("forkserver") if p.parent() and "forkserver" in
                      " ".join(p.parent().cmdline())]
    assert reward_workers, "no reward worker found"
    reward_workers[0].kill()
    code, out = run.finish()
    assert "rollout engine 0 died (ActorDiedError)" in out
    assert_completed(run, code, out)


def test_engine_core_process_killed_mid_generate_is_replaced(ray_local, capsys):
    """vLLM's engine core as its own process (how GPU engines run): kill -9 of it inside a generate
    call (which then never returns) is seen by the probe; the engine is replaced and, sampling from
    per-prompt seeds, regenerates exactly what an undisturbed call returns."""
    from launch.schema import LivenessConfig
    from rollout.worker import EngineSpec, RolloutGroup, Sampling
    from conftest import TINY_POLICY

    group = RolloutGroup(EngineSpec(str(TINY_POLICY), "float32", 256, seed=0, in_process=False), engines=1,
                         liveness=LivenessConfig(probe_interval_s=1), max_replacements=1).wait_ready()
    try:
        prompts, seeds = [[5 + i, 9, 17, 3 + i] * 4 for i in range(32)], list(range(32))
        pending = group.submit(prompts, Sampling(8, 1.0, 1.0, 64), seeds=seeds)
        cores = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "VLLM::EngineCore"
                 and any("RolloutWorker" in parent.name() for parent in p.parents())]
        assert len(cores) == 1, cores
        cores[0].kill()
        repaired = group.wait(pending)
        assert "vLLM process died: VLLM::EngineCore" in capsys.readouterr().out
        assert repaired == group.generate(prompts, Sampling(8, 1.0, 1.0, 64), seeds=seeds)
    finally:
        group.shutdown()


def test_learner_rank_killed_restarts_from_checkpoint(tmp_path):
    run = Run(tmp_path / "run")
    run.wait_for(lambda: (tmp_path / "run/checkpoints/train/latest").exists(), "the first checkpoint")
    killed = time.time()
    run.kill("ray::LearnerWorker")
    run.time_until("restarting its workers from the last checkpoint (restart 1 of 1)", killed)
    run.time_until("resumed from", killed)
    code, out = run.finish()
    assert_completed(run, code, out)


def test_stuck_learner_fails_within_its_deadline(tmp_path):
    """A rank that stops answering (SIGSTOP) ends the run at call_timeout_s, not never."""
    run = Run(tmp_path / "run", "cluster.max_restarts=0", "cluster.liveness.call_timeout_s=15")
    run.wait_step(1)
    stopped = time.time()
    run.processes("ray::LearnerWorker")[0].send_signal(signal.SIGSTOP)
    code, out = run.finish()
    print(f"[fault timing] stuck learner: exit {code} after {time.time() - stopped:.1f}s")
    assert code == 1 and time.time() - stopped < 90, out[-3000:]
    assert "no answer from learner rank 0 within 15s" in out and "Traceback" not in out
    assert final_states(tmp_path / "run") == ("failed", "failed")
    assert run.leftovers() == []


def test_driver_killed_during_checkpoint_write_then_resumed(tmp_path):
    """kill -9 of the whole driver while a checkpoint is half written; a torn metrics line too."""
    run = Run(tmp_path / "run")
    partial = tmp_path / "run/checkpoints/train/step_000002.partial"
    run.wait_for(partial.exists, "a checkpoint write", poll_s=0.002)  # it exists for well under a second
    os.killpg(run.proc.pid, signal.SIGKILL)
    run.finish()
    latest = tmp_path / "run" / "checkpoints" / "train" / "latest"
    assert not latest.exists() or latest.read_text() == "step_000002"  # never the half-written folder
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"stage": "train", "step": 3, "reward/me')  # what a crash mid-append leaves
    resumed = Run(tmp_path / "run", resume=True)
    code, out = resumed.finish()
    assert_completed(resumed, code, out)
    assert run.leftovers(grace_s=1) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_run_resumably(tmp_path, sig):
    run = Run(tmp_path / "run")
    run.wait_step(2)
    sent = time.time()
    run.proc.send_signal(sig)
    code, out = run.finish(timeout=120)
    print(f"[fault timing] {sig.name}: exit {code} after {time.time() - sent:.1f}s")
    assert code == 130 and time.time() - sent < 60, out[-3000:]
    assert "interrupted" in out and "Traceback" not in out
    assert final_states(tmp_path / "run") == ("interrupted", "interrupted")
    assert run.leftovers() == []
    if sig == signal.SIGTERM:  # once is enough: resuming continues to the end
        resumed = Run(tmp_path / "run", resume=True)
        code, out = resumed.finish()
        assert_completed(resumed, code, out)


def test_exploding_learning_rate_never_reports_success(tmp_path):
    """lr 1e30 is a valid number that destroys the weights in one step: the run must stop."""
    start = time.time()
    run = Run(tmp_path / "run", "stages.train.learner.optim.lr=1e30", "stages.train.learner.optim.warmup_ratio=0")
    code, out = run.finish()
    print(f"[fault timing] lr 1e30: exit {code} after {time.time() - start:.1f}s from launch")
    assert code == 1, out[-3000:]
    assert "NonFiniteError" in out and "Traceback" not in out
    assert final_states(tmp_path / "run") == ("failed", "failed")
    assert not (tmp_path / "run/train/model").exists()
    assert run.leftovers() == []


def test_infeasible_resources_fail_before_any_actor(tmp_path):
    start = time.time()
    run = Run(tmp_path / "run", "stages.train.rollout.num_gpus_per_engine=1")
    code, out = run.finish(timeout=120)
    print(f"[fault timing] GPU engine on a CPU cluster: exit {code} after {time.time() - start:.1f}s from launch")
    assert code == 1
    assert "stages.train.rollout: each worker needs 1 GPU, but no node of the Ray cluster has that much" in out
    assert not (tmp_path / "run/train").exists() and run.leftovers() == []
