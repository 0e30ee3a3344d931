"""Checkpoints: `<dir>/step_000010/{hf/, deepspeed/, state.json}` written whole or not at all.

A checkpoint is assembled in `step_XXXXXX.partial/` and renamed when complete; `latest` names the
newest complete one, so a crash mid-write leaves the previous checkpoint as the resume point.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from rl.fileio import write_json_atomic, write_text_atomic


class CheckpointManager:
    def __init__(self, directory: Path, keep_last: int):
        self.directory, self.keep_last = Path(directory), keep_last

    def begin(self, step: int) -> Path:
        partial = self.directory / f"step_{step:06d}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        return partial

    def commit(self, partial: Path, state: dict) -> Path:
        write_json_atomic(partial / "state.json", state)
        final = partial.with_suffix("")
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        write_text_atomic(self.directory / "latest", final.name)
        for old in sorted(self.directory.glob("step_??????"))[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def latest(self) -> Path | None:
        pointer = self.directory / "latest"
        if not pointer.exists():
            return None
        path = self.directory / pointer.read_text().strip()
        return path if (path / "state.json").exists() else None

    @staticmethod
    def state(path: Path) -> dict:
        return json.loads((path / "state.json").read_text())
