"""The job graph: stages sorted by `needs`, independent ones run concurrently.

A stage is done when `<run_dir>/<stage>/status.json` says so; a resubmitted run skips done stages.
Each stage writes its artifact under its own folder and records where it came from (lineage).
"""
from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path


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


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def run_graph(recipe, run_dir: Path, resume: bool = False, log=print) -> dict[str, dict]:
    """Run every stage not yet done; returns {stage: artifact record}. Raises StageFailed.

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

    with ThreadPoolExecutor(max_workers=max(1, len(stages))) as pool:
        while waiting or running:
            for name in [n for n in waiting if all(d in artifacts for d in stages[n].needs)]:
                stage = stages[name]
                inputs = {d: artifacts[d] for d in stage.needs}
                (run_dir / name).mkdir(parents=True, exist_ok=True)
                write_json_atomic(run_dir / name / "status.json", {
                    "state": "running", "kind": stage.kind, "started": time.time(), "inputs": inputs})
                running[pool.submit(run_stage, runners[stage.kind], recipe, name, run_dir, inputs, resume)] = name
                waiting.remove(name)
                log(f"[graph] stage '{name}' ({stage.kind}) started")
            done = next(as_completed(running))
            name = running.pop(done)
            status = read_status(run_dir / name)
            try:
                artifacts[name] = done.result()
            except Exception as e:
                status.update(state="failed", finished=time.time(), error=f"{type(e).__name__}: {e}")
                write_json_atomic(run_dir / name / "status.json", status)
                raise StageFailed(name, e) from e
            status.update(state="done", finished=time.time(), artifact=artifacts[name])
            write_json_atomic(run_dir / name / "status.json", status)
            log(f"[graph] stage '{name}' done in {status['finished'] - status['started']:.1f}s")
    return artifacts


class StageFailed(RuntimeError):
    def __init__(self, stage: str, cause: Exception):
        super().__init__(f"stage '{stage}' failed: {type(cause).__name__}: {cause}")
        self.stage = stage
