"""Reading an offline W&B run back, for tests/test_wandb.py and tests/test_e2e.py.

The reader is wandb's own: `wandb leet inspect --json` (wandb-core) prints each record of a run's
`.wandb` transaction log as one JSON object. Tables live as files under the run's `files/` folder,
named by the `path` their history entry records.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path


@dataclass
class OfflineRun:
    """One offline session of a W&B run (a resumed run writes one folder per session)."""
    folder: Path
    run: dict                        # the run record: run_id, display_name, run_group, job_type, ...
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)   # each row with its "_step"
    summary: dict = field(default_factory=dict)
    artifacts: list[dict] = field(default_factory=list)
    exit_code: int | None = None

    def history_keys(self) -> set[str]:
        return {k for row in self.history for k in row if not k.startswith("_")}

    def table(self, key: str) -> dict:
        """The last table logged under `key`, as wandb wrote its file: {"columns", "data"}."""
        row = next(r for r in reversed(self.history) if r.get(f"{key}._type") == "table-file")
        return json.loads((self.folder / "files" / row[f"{key}.path"]).read_text())


def records(folder: Path) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(folder)],
                         capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def read_offline_run(folder: Path) -> OfflineRun:
    recs = records(folder)
    run = OfflineRun(folder, next(r["run"] for r in recs if r["type"] == "run"))
    for r in recs:
        kind = r["type"]
        if kind == "run":
            run.config.update(r["run"].get("config", {}).get("update", {}))
        elif kind == "config":
            run.config.update(r["config"].get("update", {}))
        elif kind == "history":
            run.history.append(r["history"]["item"])
        elif kind == "summary":
            run.summary.update(r["summary"].get("update", {}))
        elif kind == "artifact":
            run.artifacts.append(r["artifact"])
        elif kind == "exit":
            run.exit_code = r["exit"].get("exit_code", 0)
    run.config.pop("_wandb", None)
    return run


def started(run: OfflineRun) -> datetime:
    return datetime.fromisoformat(run.run["start_time"])


def read_offline_runs(run_dir: Path) -> dict[str, list[OfflineRun]]:
    """{W&B display name: its sessions, oldest first} of a prunerl run directory."""
    runs: dict[str, list[OfflineRun]] = {}
    sessions = sorted(map(read_offline_run, (run_dir / "wandb").glob("offline-run-*")), key=started)
    for run in sessions:
        runs.setdefault(run.run.get("display_name", run.run["run_id"]), []).append(run)
    return runs
