"""Run-directory files: atomic replacement and JSON-lines logs that survive a torn last line."""
import json

import pytest

from rl.fileio import publish_file, read_jsonl, rewrite_jsonl, write_json_atomic
from rl.tracking import drop_records_after, read_metrics


def test_publish_file_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "state.json"
    write_json_atomic(target, {"step": 1})
    with pytest.raises(RuntimeError):
        with publish_file(target) as tmp:
            tmp.write_text('{"step": 2, "trunc')
            raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left behind


def test_torn_last_line_is_skipped_and_dropped_before_the_next_append(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"stage": "train", "step": 1}\n{"stage": "train", "step": 2}\n{"stage": "train", "st')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    drop_records_after(log, "train", 1)
    assert log.read_text() == '{"stage": "train", "step": 1}\n'


def test_a_bad_line_inside_a_log_names_the_file_and_line(tmp_path):
    log = tmp_path / "batches.jsonl"
    log.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"batches.jsonl:2: not a JSON record"):
        read_jsonl(log)


def test_rewrite_keeps_other_stages_records(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"stage": s, "step": k}) + "\n" for s in ("a", "b") for k in (1, 2, 3)))
    rewrite_jsonl(log, lambda r: not (r["stage"] == "a" and r["step"] > 1))
    assert [(r["stage"], r["step"]) for r in read_jsonl(log)] == [("a", 1), ("b", 1), ("b", 2), ("b", 3)]
