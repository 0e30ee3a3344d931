"""Waiting on Ray workers without hanging: deadlines, health probes, fast failure and stop requests.

Every driver-side wait on a worker goes through `gather`. It returns the results in order, or
raises as soon as it knows the wait cannot succeed:
- `WorkerFailure` when a worker process died, a probe reports a dead component (a vLLM engine
  core), or the deadline passed. The run can restart its workers from the last checkpoint.
- `WorkerError` when a worker's method raised: a bug or a bad input, which a restart won't fix.
- `RunInterrupted` once `request_stop()` was called (Ctrl-C / SIGTERM in the CLI).
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

import ray

STOP_POLL_S = 0.5  # how often a wait looks at the stop flag
_STOP = threading.Event()
_stop_reason = ["interrupted"]

# Exceptions raised inside a worker that mean "this worker is gone", by class name: the driver
# need not import vLLM to recognise them.
_DEAD_WORKER_ERRORS = {"EngineDeadError", "EngineGenerateError"}


class WorkerFailure(RuntimeError):
    """A worker died, stopped answering or missed its deadline; restarting the workers may help.
    `workers` names the workers at fault."""

    def __init__(self, message: str, workers: Sequence[str] = ()):
        super().__init__(message)
        self.workers = list(workers)


class WorkerError(RuntimeError):
    """A worker's method raised; `cause` is the original exception."""

    def __init__(self, message: str, cause: BaseException):
        super().__init__(message)
        self.cause = cause


class RunInterrupted(RuntimeError):
    """The run was asked to stop (Ctrl-C, SIGTERM)."""


def request_stop(reason: str = "interrupted") -> None:
    _stop_reason[0] = reason
    _STOP.set()


def clear_stop() -> None:
    _STOP.clear()


def check_stop() -> None:
    if _STOP.is_set():
        raise RunInterrupted(_stop_reason[0])


def gather(refs: Sequence, names: Sequence[str], what: str, timeout_s: float,
           probe: Callable[[], dict[str, str]] | None = None, probe_interval_s: float = 5.0) -> list:
    """`ray.get(refs)` that fails fast. names[i] names the worker behind refs[i] in messages;
    `what` is the call ("generate", "train"); `probe()` returns {worker name: problem} for
    workers that are alive but broken inside (it runs every `probe_interval_s` while waiting)."""
    position = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * len(refs)
    pending = list(refs)
    start = time.monotonic()
    next_probe = start + probe_interval_s
    while pending:
        check_stop()
        now = time.monotonic()
        if now - start > timeout_s:
            late = [names[position[r]] for r in pending]
            raise WorkerFailure(f"{what}: no answer from {', '.join(late)} within {timeout_s:g}s", late)
        if probe is not None and now >= next_probe:
            problems = probe()
            if problems:
                raise WorkerFailure(f"{what}: " + "; ".join(problems.values()), list(problems))
            next_probe = time.monotonic() + probe_interval_s
        wait_s = min(STOP_POLL_S, max(0.0, start + timeout_s - now))
        ready, pending = ray.wait(pending, num_returns=1, timeout=wait_s)
        for ref in ready:
            results[position[ref]] = get_one(ref, names[position[ref]], what)
    return results


def get_one(ref, name: str, what: str):
    """ray.get of a finished ref, with Ray's exceptions turned into ours."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if isinstance(e.cause, BaseException) else e
        if type(cause).__name__ in _DEAD_WORKER_ERRORS:
            raise WorkerFailure(f"{what}: {name} lost its engine ({type(cause).__name__})", [name]) from None
        raise WorkerError(f"{what} on {name} failed: {type(cause).__name__}: {_first_line(cause)}", cause) from None
    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
            ray.exceptions.ObjectLostError) as e:
        raise WorkerFailure(f"{what}: {name} died ({type(e).__name__})", [name]) from None


def wait_placement(pg, what: str, bundles: list[dict], timeout_s: float) -> None:
    """Wait for a placement group's resources, or say what could not be placed."""
    ready = pg.ready()
    start = time.monotonic()
    while True:
        check_stop()
        done, _ = ray.wait([ready], timeout=STOP_POLL_S)
        if done:
            return
        if time.monotonic() - start > timeout_s:
            free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
            raise WorkerFailure(f"{what}: could not reserve {bundles} within {timeout_s:g}s "
                                f"(cluster.liveness.startup_timeout_s); free now: {free}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]
