"""The job graph: stages sorted by `needs`, independent ones run concurrently.

A stage is done when `<run_dir>/<stage>/status.json` says so; a resubmitted run skips done stages.
Each stage writes its artifact under its own folder and records where it came from (lineage).
"""
from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed, wait
from pathlib import Path

from rl.fileio import write_json_atomic
from rl.liveness import RunInterrupted, WorkerError, WorkerFailure, clear_stop, request_stop


def topological_order(needs: dict[str, list[str]]) -> list[str]:
    """Kahn's algorithm in declaration order; raises ValueError naming a cycle's members."""
    order, done = [], set()
    pending = dict(needs)
    while pending:
        ready = [n for n, deps in pending.items() if all(d in done for d in deps)]
        if not ready:
            raise ValueError(f"stages form a cycle: {', '.join(sorted(pending))}")
        for n in ready:
            order.append(n)
            done.add(n)
            del pending[n]
    return order


def read_status(stage_dir: Path) -> dict | None:
    f = stage_dir / "status.json"
    return json.loads(f.read_text()) if f.exists() else None


def run_graph(recipe, run_dir: Path, resume: bool = False, log=print) -> dict[str, dict]:
    """Run every stage not yet done; returns {stage: artifact record}. Raises StageFailed when a
    stage fails and RunInterrupted on Ctrl-C / SIGTERM, after stopping the stages still running.

    Each stage's controller runs in a driver thread (so its progress lines reach the console) and
    places its own workers on the cluster as Ray actors with the resources its config declares.
    """
    from launch.stages import load_runner, run_stage

    stages = {s.name: s for s in recipe.stages}
    runners = {s.kind: load_runner(s.kind) for s in recipe.stages}
    artifacts: dict[str, dict] = {}
    running: dict[Future, str] = {}
    waiting = topological_order({n: s.needs for n, s in stages.items()})

    for name in list(waiting):
        status = read_status(run_dir / name)
        if status and status.get("state") == "done":
            log(f"[graph] stage '{name}' already done, skipping")
            artifacts[name] = status["artifact"]
            waiting.remove(name)

    pool = ThreadPoolExecutor(max_workers=max(1, len(stages)), thread_name_prefix="stage")
    try:
        while waiting or running:
            for name in [n for n in waiting if all(d in artifacts for d in stages[n].needs)]:
                stage = stages[name]
                inputs = {d: artifacts[d] for d in stage.needs}
                (run_dir / name).mkdir(parents=True, exist_ok=True)
                write_json_atomic(run_dir / name / "status.json", {
                    "state": "running", "kind": stage.kind, "started": time.time(), "inputs": inputs})
                running[pool.submit(run_stage, runners[stage.kind], recipe, name, run_dir, inputs, resume, log)] = name
                waiting.remove(name)
                log(f"[graph] stage '{name}' ({stage.kind}) started")
            done = next(as_completed(running))
            name = running.pop(done)
            try:
                artifacts[name] = done.result()
            except Exception as e:
                _finish(run_dir / name, "failed", error=f"{type(e).__name__}: {e}")
                raise StageFailed(name, e) from e
            status = _finish(run_dir / name, "done", artifact=artifacts[name])
            log(f"[graph] stage '{name}' done in {status['finished'] - status['started']:.1f}s")
    except BaseException as e:  # a failed stage, Ctrl-C or SIGTERM: stop the stages still running
        _stop(running, run_dir, "failed" if isinstance(e, StageFailed) else "interrupted", log)
        if isinstance(e, KeyboardInterrupt):
            raise RunInterrupted("interrupted") from None
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return artifacts


STOP_GRACE_S = 60  # how long stopping stages get to stop their workers


def _stop(running: dict[Future, str], run_dir: Path, why: str, log) -> None:
    """Ask every running stage to stop, give them STOP_GRACE_S, and record each one's state."""
    if not running:
        return
    log(f"[graph] stopping stage(s) {', '.join(running.values())} ...")
    request_stop("another stage failed" if why == "failed" else why)
    try:
        wait(list(running), timeout=STOP_GRACE_S)
        for future, name in running.items():
            error = future.exception() if future.done() else None
            if future.done() and error is None:
                _finish(run_dir / name, "done", artifact=future.result())
            elif error is not None and not isinstance(error, RunInterrupted):
                _finish(run_dir / name, "failed", error=f"{type(error).__name__}: {error}")
            else:
                _finish(run_dir / name, "interrupted")
    finally:
        clear_stop()


def _finish(stage_dir: Path, state: str, **fields) -> dict:
    status = read_status(stage_dir) or {"started": time.time()}
    status.update(state=state, finished=time.time(), **fields)
    write_json_atomic(stage_dir / "status.json", status)
    return status


class StageFailed(RuntimeError):
    def __init__(self, stage: str, cause: Exception):
        ours = isinstance(cause, (WorkerError, WorkerFailure))  # their message names the worker and the cause
        super().__init__(f"stage '{stage}' failed: {cause if ours else f'{type(cause).__name__}: {cause}'}")
        self.stage = stage
