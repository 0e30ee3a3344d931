"""The job graph: stages sorted by `needs`, independent ones run concurrently.

Each stage writes its artifact under its own folder and records in `<run_dir>/<stage>/status.json`
its state (waiting, running, done, failed, cancelled, skipped, interrupted) and its lineage: a hash
of its resolved config and the versions of the artifacts it consumed. A resubmitted run skips a
done stage only when its lineage is unchanged; a stage that runs again gets a new version, so what
depends on it runs again too.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
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


def lineage(recipe, stage, inputs: dict[str, dict]) -> dict:
    """What a stage's output depends on: its config, the recipe's model/data/seed, its inputs' versions."""
    config = json.dumps([stage.model_dump(mode="json"), recipe.model.model_dump(mode="json"),
                         recipe.data.model_dump(mode="json"), recipe.seed], sort_keys=True)
    return {"config": hashlib.sha256(config.encode()).hexdigest()[:16],
            "inputs": {name: art.get("version") for name, art in sorted(inputs.items())}}


def run_graph(recipe, run_dir: Path, resume: bool = False, log=print) -> dict[str, dict]:
    """Run every stage whose output is missing or stale; returns {stage: artifact record}.

    When a stage fails, `cluster.on_stage_failure` decides: `cancel` stops the stages still running
    and raises at once; `finish` lets independent branches run to the end, then raises. Either way
    the stages that need a failed one are marked skipped. Raises RunInterrupted on Ctrl-C / SIGTERM,
    after stopping the stages still running.
    """
    from launch.stages import load_runner
    import rl.tracking  # noqa: F401 - wandb's first import in this (main) thread, not in a stage thread's _start

    stages = {s.name: s for s in recipe.stages}
    runners = {s.kind: load_runner(s.kind) for s in recipe.stages}
    artifacts: dict[str, dict] = {}
    unfinished: set[str] = set()  # failed, cancelled or skipped
    failure: StageFailed | None = None
    running: dict[Future, str] = {}
    waiting = topological_order({n: s.needs for n, s in stages.items()})

    pool = ThreadPoolExecutor(max_workers=max(1, len(stages)), thread_name_prefix="stage")
    try:
        while waiting or running:
            for name in list(waiting):
                stage = stages[name]
                blocked = [d for d in stage.needs if d in unfinished]
                if blocked:
                    _finish(run_dir / name, "skipped", error=f"needs stage(s) that did not finish: {', '.join(blocked)}")
                    log(f"[graph] stage '{name}' skipped: {', '.join(blocked)} did not finish")
                    unfinished.add(name)
                    waiting.remove(name)
                elif all(d in artifacts for d in stage.needs):
                    waiting.remove(name)
                    inputs = {d: artifacts[d] for d in stage.needs}
                    current, previous = lineage(recipe, stage, inputs), read_status(run_dir / name)
                    same = previous is not None and previous.get("lineage") == current
                    if same and previous["state"] == "done":
                        log(f"[graph] stage '{name}' already done with the same config and inputs, skipping")
                        artifacts[name] = previous["artifact"]
                        continue
                    if previous is not None and not same:
                        log(f"[graph] stage '{name}': its config or inputs changed since it last ran; running it again")
                    future = pool.submit(_start, runners[stage.kind], recipe, stage, run_dir, inputs, current,
                                         resume and same, log)
                    running[future] = name
            if not running:
                break
            future = next(as_completed(running))
            name = running.pop(future)
            try:
                artifacts[name] = {**future.result(), "version": uuid.uuid4().hex[:12]}
            except Exception as e:
                _finish(run_dir / name, "failed", error=f"{type(e).__name__}: {e}")
                unfinished.add(name)
                failure = failure or StageFailed(name, e)
                if recipe.cluster.on_stage_failure == "cancel":
                    raise failure from e
                log(f"[graph] {StageFailed(name, e)}; independent stages go on (cluster.on_stage_failure: finish)")
                continue
            status = _finish(run_dir / name, "done", artifact=artifacts[name])
            log(f"[graph] stage '{name}' done in {status['finished'] - status['started']:.1f}s")
        if failure is not None:
            raise failure
    except BaseException as e:  # a failed stage, Ctrl-C or SIGTERM: stop the stages still running
        _stop(running, run_dir, "cancelled" if isinstance(e, StageFailed) else "interrupted", log)
        if isinstance(e, KeyboardInterrupt):
            raise RunInterrupted("interrupted") from None
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return artifacts


def _start(runner, recipe, stage, run_dir: Path, inputs: dict, current: dict, resume: bool, log) -> dict:
    """Run a stage in this (pool) thread: record it waiting with its lineage `current`, reserve its
    resources, run it. `resume`: continue from its checkpoints (an earlier run of the same lineage)."""
    from launch.stages import run_stage
    from rl.tracking import log_model_reference

    stage_dir = run_dir / stage.name
    checkpoints = run_dir / "checkpoints" / stage.name
    if not resume and checkpoints.exists():  # from an earlier attempt; a restart must not resume from them
        shutil.rmtree(checkpoints)
    stage_dir.mkdir(parents=True, exist_ok=True)
    status = {"state": "waiting", "kind": stage.kind, "inputs": inputs, "lineage": current, "started": time.time()}
    write_json_atomic(stage_dir / "status.json", status)

    def placed():
        write_json_atomic(stage_dir / "status.json", {**status, "state": "running", "started": time.time()})
        log(f"[graph] stage '{stage.name}' ({stage.kind}) started")

    artifact = run_stage(runner, recipe, stage.name, run_dir, inputs, resume, log, on_placed=placed)
    log_model_reference(recipe, run_dir, stage.name, artifact, log)  # a stage that made a model: W&B points at it
    return artifact


STOP_GRACE_S = 60  # how long stopping stages get to stop their workers


def _stop(running: dict[Future, str], run_dir: Path, why: str, log) -> None:
    """Ask every running stage to stop, give them STOP_GRACE_S, and record each one's state."""
    if not running:
        return
    log(f"[graph] stopping stage(s) {', '.join(running.values())} ...")
    request_stop("another stage failed" if why == "cancelled" else why)
    try:
        wait(list(running), timeout=STOP_GRACE_S)
        for future, name in running.items():
            error = future.exception() if future.done() else None
            if future.done() and error is None:
                _finish(run_dir / name, "done", artifact={**future.result(), "version": uuid.uuid4().hex[:12]})
            elif error is not None and not isinstance(error, RunInterrupted):
                _finish(run_dir / name, "failed", error=f"{type(error).__name__}: {error}")
            else:
                _finish(run_dir / name, why)
    finally:
        clear_stop()


def _finish(stage_dir: Path, state: str, **fields) -> dict:
    status = read_status(stage_dir) or {"started": time.time()}
    status.update(state=state, finished=time.time(), **fields)
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stage_dir / "status.json", status)
    return status


class StageFailed(RuntimeError):
    def __init__(self, stage: str, cause: Exception):
        ours = isinstance(cause, (WorkerError, WorkerFailure))  # their message names the worker and the cause
        super().__init__(f"stage '{stage}' failed: {cause if ours else f'{type(cause).__name__}: {cause}'}")
        self.stage = stage
