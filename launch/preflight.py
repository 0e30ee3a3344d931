"""Checks that need the filesystem, run before any actor starts: a local model folder exists, and
every local data file is rows holding the recipe's question and answer fields (`lookup` reads a
dotted key as a path into nested objects, here and in `rl.data`).

Each problem is one `field path: message` line, like the schema's; a file's problem names the file
and the line (`train.jsonl:3: ...` for JSON Lines and CSV) or row (`train.json: row 3: ...` for a
JSON array or Parquet). Files are streamed; a few bad rows are
shown, then a count, and a file with very many bad rows is not read to its end. Hub datasets cannot
be checked offline and are left to `datasets` at load time.

The readers here are also what `rl.data.load_rows` reads local files with, so a file that passes
these checks loads, row for row, as it was checked.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from launch.schema import DATA_FILE_TYPES, clip
from rewards.boxed import last_boxed

SHOWN = 5  # bad rows reported per file; the rest are counted
STOP_AFTER = 1000  # bad rows after which a file is not read further
HELD_OUT_TEXT_TYPES = (".txt", ".jsonl")  # an eval stage's perplexity_data (evaluation/perplexity.py)


class DataFileError(ValueError):
    """A data file that cannot be read as rows; the message names the file."""


class BadRow(str):
    """What `read_rows` yields in place of a row it cannot read: the problem."""


class MissingKey(LookupError):
    """A row without the field a data key names; the message says which part is missing, and where."""


def lookup(row: dict, key: str) -> Any:
    """The field `key` of `row`: its column of that name, else a dotted path through nested objects
    and arrays ("reward_model.ground_truth", "prompt.0.content"). Raises MissingKey."""
    if key in row:
        return row[key]
    value, parts = row, key.split(".")
    for depth, part in enumerate(parts):
        parent = ".".join(parts[:depth])
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif depth == 0:
            raise MissingKey(f"no key {key!r} (keys: {_keys(row)})")
        elif isinstance(value, dict):
            raise MissingKey(f"no key {part!r} in {parent!r} (keys: {_keys(value)})")
        else:
            length = f" of length {len(value)}" if isinstance(value, list) else ""
            raise MissingKey(f"{parent!r} is {_kind(value)}{length}; no {part!r} in it for {key!r}")
    return value


def preflight(recipe) -> list[str]:
    """One line per problem with the recipe's local model folder and data files (and eval stages'
    held-out text); empty when none."""
    problems = []
    config = Path(recipe.model.path).expanduser() / "config.json"
    if _looks_local(recipe.model.path) and not config.is_file():
        problems.append(f"model.path: no Hugging Face model folder (config.json) at {recipe.model.path}")
    elif config.is_file():
        problems += context_problems(recipe, config)
    for split in ("train", "eval"):
        data = recipe.data.for_split(split)
        problems += data_file_problems(f"data.{split}.path", getattr(data, split).path,
                                       data.question_key, data.answer_key, data.answer_format)
    for stage in recipe.stages:
        if stage.kind == "eval" and stage.perplexity_data is not None:
            problems += held_out_text_problems(f"stages.{stage.name}.perplexity_data", stage.perplexity_data)
    return problems


def context_problems(recipe, config: Path) -> list[str]:
    """Prompt plus completion must fit the model's context: vLLM refuses a longer max_model_len
    with a page of text after the engines started."""
    try:
        limit = json.loads(config.read_text()).get("max_position_embeddings")
    except (OSError, ValueError) as e:
        return [f"model.path: cannot read {config}: {e}"]
    if not isinstance(limit, int):
        return []
    problems = []
    for stage in recipe.stages:
        field = {"rl": "rollout.max_new_tokens", "eval": "max_new_tokens"}.get(stage.kind)
        if field is None:
            continue
        new_tokens = stage.rollout.max_new_tokens if stage.kind == "rl" else stage.max_new_tokens
        if recipe.data.max_prompt_tokens + new_tokens > limit:
            problems.append(f"stages.{stage.name}.{field}: data.max_prompt_tokens + {field} = "
                            f"{recipe.data.max_prompt_tokens} + {new_tokens} exceeds the model's context of "
                            f"{limit} tokens (max_position_embeddings in {config})")
    return problems


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") != 1


def local_data_file(name: str) -> Path | None:
    """The file a `data.*.path` names, or None for a hub dataset name or a local dataset folder."""
    path = Path(name).expanduser()
    if path.is_dir() or not (path.suffix.lower() in DATA_FILE_TYPES or path.exists()
                             or name.startswith((".", "/", "~"))):
        return None
    return path


def data_file_problems(field: str, name: str, question_key: str, answer_key: str, answer_format: str) -> list[str]:
    """Problems of the data file `name` (a recipe's `data.*.path`), each line naming `field`."""
    path = local_data_file(name)
    if path is None:
        return []
    return _rows_problems(field, path, name, (question_key, answer_key),
                          lambda row: _row_problem(row, question_key, answer_key, answer_format))


def held_out_text_problems(field: str, name: str) -> list[str]:
    """Problems of an eval stage's `perplexity_data`: a .txt document, or .jsonl rows with a `text` field."""
    path = Path(name).expanduser()
    if path.suffix.lower() not in HELD_OUT_TEXT_TYPES:
        return [f"{field}: {name} is neither a .txt nor a .jsonl file"]
    if not path.is_file():
        return [f"{field}: file not found: {name}"]
    if path.suffix.lower() == ".jsonl":
        return _rows_problems(field, path, name, None, _text_row_problem)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        return [f"{field}: {name}: not UTF-8 text (byte {e.start})"]
    except OSError as e:
        return [f"{field}: {name}: cannot read: {e.strerror or e}"]
    return [] if text.strip() else [f"{field}: {name}: is empty"]


def _text_row_problem(row) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object, found {_kind(row)}"
    if not isinstance(row.get("text"), str) or not row["text"].strip():
        return "no text in 'text'" if "text" in row else f"no key 'text' (keys: {_keys(row)})"
    return None


def _rows_problems(field: str, path: Path, name: str, columns, row_problem) -> list[str]:
    """The first SHOWN bad rows of a local file (each with its line or row), then a count."""
    problems, bad, count = [], 0, 0
    try:
        for where, row in read_rows(path, name, columns):
            count += 1
            problem = row if isinstance(row, BadRow) else row_problem(row)
            if problem is None:
                continue
            bad += 1
            if bad <= SHOWN:
                problems.append(f"{field}: {name}{where}: {problem}")
            if bad == STOP_AFTER:
                break
    except DataFileError as e:
        return [f"{field}: {e}"]
    if bad > SHOWN:
        more = "at least " if bad == STOP_AFTER else ""
        problems.append(f"{field}: {name}: ... and {more}{bad - SHOWN} more bad rows")
    if count == 0:
        problems.append(f"{field}: {name}: has no rows")
    return problems


def _kind(value) -> str:
    return {dict: "an object", list: "an array", str: "text", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _keys(row: dict) -> str:
    return ", ".join(clip(str(k), 30) for k in list(row)[:8]) + (", ..." if len(row) > 8 else "") or "none"


def _row_problem(row, question_key: str, answer_key: str, answer_format: str) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object, found {_kind(row)}"
    missing = [k for k in (question_key, answer_key) if k not in row and k.split(".")[0] not in row]
    if missing:
        return f"no key {' or '.join(repr(k) for k in missing)} (keys: {_keys(row)})"
    try:
        question, answer = lookup(row, question_key), lookup(row, answer_key)
    except MissingKey as e:
        return str(e)
    if not isinstance(question, str) or not question.strip():
        return f"{question_key!r} is {'empty' if isinstance(question, str) else _kind(question)}; expected text"
    if answer is None or answer == "" or isinstance(answer, (dict, list)):
        return f"{answer_key!r} is {'empty' if answer == '' else _kind(answer)}; expected text or a number"
    if answer_format == "boxed" and last_boxed(str(answer)) is None:
        return f"{answer_key!r} has no complete \\boxed{{}} answer (data.answer_format: boxed)"
    return None


# ---------------------------------------------------------------- reading local files

def read_rows(path: Path, name: str, columns: tuple[str, ...] | None = None) -> Iterator[tuple[str, Any]]:
    """(where, row) for each row of a local data file: `where` is ":N" (line N) or ": row N", to
    follow the file's name, and `row` a dict, another JSON value, or a BadRow saying why that row
    cannot be read. Raises DataFileError, naming the file as `name`, when the file as a whole cannot
    be read. `columns`: data keys that must be columns of a CSV or Parquet file (a dotted key: the
    column of its first part, unless one has its whole name); Parquet reads only those columns."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataFileError(f"file not found: {name}")
    if suffix not in DATA_FILE_TYPES:
        raise DataFileError(f"{name}: unknown data file type '{suffix or '(no extension)'}'; "
                            f"supported: {', '.join(DATA_FILE_TYPES)}")
    reader = {".jsonl": _json_lines, ".json": _json_file, ".csv": _csv_rows, ".parquet": _parquet_rows}[suffix]
    try:
        if path.stat().st_size == 0:
            raise DataFileError(": is empty")
        yield from reader(path, columns)
    except DataFileError as e:
        raise DataFileError(f"{name}{e}") from None  # the readers' messages start with ":N: " or ": "
    except UnicodeDecodeError as e:
        raise DataFileError(f"{name}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataFileError(f"{name}: cannot read: {e.strerror or e}") from None


def _json_lines(path: Path, _=None) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            try:
                yield f":{number}", json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield f":{number}", BadRow("not UTF-8 text")
            except json.JSONDecodeError as e:
                yield f":{number}", BadRow(f"not valid JSON ({e.msg} at column {e.colno})")


def _json_file(path: Path, _=None) -> Iterator[tuple[str, Any]]:
    """A .json file: a JSON array of rows, one JSON value (one row), or else JSON Lines."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":
            raise DataFileError(f":{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        yield from _json_lines(path)  # several values: JSON Lines
        return
    if isinstance(data, list):
        for number, row in enumerate(data, 1):
            yield f": row {number}", row
    else:
        yield ": row 1", data


def _csv_rows(path: Path, columns: tuple[str, ...] | None) -> Iterator[tuple[str, Any]]:
    """Rows of a CSV file with a header row, each at the line it starts on; every cell is text."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                return
            _require(columns, header)
            start = reader.line_num + 1
            for cells in reader:
                where, start = f":{start}", reader.line_num + 1
                if not cells:
                    continue  # a blank line
                if len(cells) != len(header):
                    yield where, BadRow(f"{len(cells)} cells; the header has {len(header)}")
                else:
                    yield where, dict(zip(header, cells))
        except csv.Error as e:
            raise DataFileError(f":{reader.line_num}: not valid CSV ({e})") from None


def _parquet_rows(path: Path, columns: tuple[str, ...] | None) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise DataFileError(f": not a Parquet file ({clip(str(e), 200)})") from None
    number = 0
    for batch in file.iter_batches(columns=_require(columns, file.schema_arrow.names)):
        for row in batch.to_pylist():
            number += 1
            yield f": row {number}", row


def _require(columns: tuple[str, ...] | None, names: list[str]) -> list[str] | None:
    """The file's columns that hold the data keys `columns` (None: all of them)."""
    if columns is None:
        return None
    held = {c: c if c in names else c.split(".")[0] for c in columns}
    missing = [c for c, column in held.items() if column not in names]
    if missing:
        shown = ", ".join(clip(c, 30) for c in names[:8]) + (", ..." if len(names) > 8 else "")
        raise DataFileError(f": no column {' or '.join(repr(c) for c in missing)} (columns: {shown or 'none'})")
    return list(dict.fromkeys(held.values()))
