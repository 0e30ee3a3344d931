"""Waits on real Ray actors fail fast and say which worker and why (rl/liveness.py)."""
import threading
import time

import pytest

from rl.liveness import RunInterrupted, WorkerError, WorkerFailure, gather, request_stop


@pytest.fixture(scope="module")
def workers(ray_local):
    class Worker:  # defined here so that Ray ships it by value
        def echo(self, x):
            return x

        def sleep(self, seconds):
            time.sleep(seconds)
            return seconds

        def fail(self):
            raise ValueError("bad input on this worker")

    actor = ray_local.remote(Worker).options(num_cpus=0, max_concurrency=4)
    handles = [actor.remote() for _ in range(2)]
    ray_local.get([h.echo.remote(0) for h in handles])
    yield handles
    for h in handles:
        ray_local.kill(h)


NAMES = ["worker 0", "worker 1"]


def test_results_come_back_in_order(workers):
    assert gather([w.echo.remote(i) for i, w in enumerate(workers)], NAMES, "echo", timeout_s=30) == [0, 1]


def test_a_raising_worker_is_reported_without_waiting_for_the_others(workers):
    start = time.monotonic()
    with pytest.raises(WorkerError, match="fail on worker 1 failed: ValueError: bad input on this worker") as info:
        gather([workers[0].sleep.remote(20), workers[1].fail.remote()], NAMES, "fail", timeout_s=60)
    assert time.monotonic() - start < 10
    assert isinstance(info.value.cause, ValueError)


def test_a_worker_past_the_deadline_is_named(workers):
    start = time.monotonic()
    with pytest.raises(WorkerFailure, match="train: no answer from worker 1 within 1s") as info:
        gather([workers[0].echo.remote(1), workers[1].sleep.remote(20)], NAMES, "train", timeout_s=1)
    assert info.value.workers == ["worker 1"] and time.monotonic() - start < 10


def test_a_probe_reports_a_broken_worker(workers):
    with pytest.raises(WorkerFailure, match="engine core died") as info:
        gather([workers[0].sleep.remote(20)], NAMES[:1], "generate", timeout_s=60,
               probe=lambda: {"worker 0": "worker 0: engine core died"}, probe_interval_s=0.5)
    assert info.value.workers == ["worker 0"]


def test_a_stop_request_interrupts_a_wait(workers):
    threading.Timer(1.0, request_stop).start()
    try:
        with pytest.raises(RunInterrupted):
            gather([workers[0].sleep.remote(20)], NAMES[:1], "generate", timeout_s=60)
    finally:
        from rl.liveness import clear_stop
        clear_stop()


def test_a_killed_worker_is_a_failure(ray_local):
    @ray_local.remote(num_cpus=0)
    class Doomed:
        def sleep(self, seconds):
            time.sleep(seconds)

    doomed = Doomed.remote()
    ref = doomed.sleep.remote(30)
    threading.Timer(1.0, lambda: ray_local.kill(doomed)).start()
    start = time.monotonic()
    with pytest.raises(WorkerFailure, match="sleep: doomed died") as info:
        gather([ref], ["doomed"], "sleep", timeout_s=60)
    assert info.value.workers == ["doomed"] and time.monotonic() - start < 15
