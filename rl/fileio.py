"""Run-directory files that survive a crash at any instant.

State files are replaced whole (`publish_file`: write a temporary file beside the target, flush
it to disk, rename it over the target). Append-only logs (`*.jsonl`) may end in a torn line when
a process dies mid-write: readers skip it and `rewrite_jsonl` drops it before the next append.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


@contextmanager
def publish_file(path: Path) -> Iterator[Path]:
    """`with publish_file(p) as tmp: <write tmp>`: afterwards `p` is the new file, or unchanged."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with publish_file(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))


def append_jsonl(path: Path, record: dict) -> None:
    with Path(path).open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines log; a torn (unparseable) last line is skipped. A bad line
    anywhere else is not a crash artefact and raises ValueError naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):
                break  # torn by a crash mid-write
            raise ValueError(f"{path}:{number}: not a JSON record ({e.msg})") from None
    return records


def rewrite_jsonl(path: Path, keep: Callable[[dict], bool]) -> None:
    """Keep the records for which keep(record) is true (and drop a torn last line)."""
    path = Path(path)
    if path.exists():
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in read_jsonl(path) if keep(r)))
