"""Data files are checked before any actor starts: each problem is one `data.<split>.path: ...` line
naming the file and the line (JSON Lines, CSV) or row (JSON array, Parquet). What passes the checks
loads, row for row, through `rl.data.load_rows`; what does not fails there too, naming the file.

Real files in tmp_path, real checks; no Ray, no model.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from launch.config import load_recipe
from launch.preflight import SHOWN, STOP_AFTER, DataFileError, data_file_problems, preflight
from launch.schema import DataSource
from rl.data import check_columns, load_rows

GOOD = [{"question": "1+1?", "answer": "#### 2"}, {"question": "2+3?", "answer": "#### 5"}]


def jsonl(rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def check(path: Path, question_key: str = "question", answer_key: str = "answer",
          answer_format: str = "gsm8k") -> list[str]:
    return data_file_problems("data.train.path", str(path), question_key, answer_key, answer_format)


def one_problem(path: Path, fragment: str) -> None:
    """Exactly one line, `data.train.path: <file><where>: ...` holding `fragment`; load_rows fails too."""
    problems = check(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"data.train.path: {path}"), problems[0]
    assert fragment in problems[0], problems[0]


# ---------------------------------------------------------------- the file itself

def test_missing_file(tmp_path):
    assert check(tmp_path / "train.jsonl") == [f"data.train.path: file not found: {tmp_path / 'train.jsonl'}"]
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        load_rows(DataSource(path=str(tmp_path / "train.jsonl")))


@pytest.mark.parametrize("name", ["train.txt", "train.JSONL.bak", "train"])
def test_unknown_extension_of_an_existing_file(tmp_path, name):
    """Used to be taken for a hub dataset name ("couldn't find any data file")."""
    path = tmp_path / name
    path.write_text(jsonl(GOOD))
    one_problem(path, "unknown data file type")
    assert ".jsonl, .json, .parquet, .csv" in check(path)[0]
    with pytest.raises(DataFileError, match="unknown data file type"):
        load_rows(DataSource(path=str(path)))


@pytest.mark.parametrize("name,content,fragment", [
    ("train.jsonl", "", ": is empty"),            # used to be `StopIteration:`
    ("train.jsonl", "\n\n  \n", ": has no rows"),
    ("train.json", "[]", ": has no rows"),
    ("train.csv", "question,answer\n", ": has no rows"),
    ("train.parquet", "", ": is empty"),
])
def test_no_rows(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_text(content)
    one_problem(path, fragment)
    with pytest.raises(DataFileError, match=str(path)):
        load_rows(DataSource(path=str(path)))


def test_empty_parquet_table(tmp_path):
    path = tmp_path / "eval.parquet"
    pq.write_table(pa.table({"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), path)
    one_problem(path, ": has no rows")


def test_not_parquet_and_not_utf8(tmp_path):
    fake = tmp_path / "train.parquet"
    fake.write_text(jsonl(GOOD))
    one_problem(fake, ": not a Parquet file")
    latin = tmp_path / "train.csv"
    latin.write_bytes("question,answer\ncafé?,1\n".encode("latin-1"))
    one_problem(latin, ": not UTF-8 text")


def test_hub_names_and_folders_are_not_checked(tmp_path):
    assert check(Path("openai/gsm8k")) == []
    (tmp_path / "dataset").mkdir()
    assert check(tmp_path / "dataset") == []


# ---------------------------------------------------------------- rows

def test_bad_json_line_names_file_and_line(tmp_path):
    """Used to be `Expected object or value at position 28`, with no file or line."""
    path = tmp_path / "train.jsonl"
    path.write_text(jsonl([GOOD[0], '{"question": "3+4?", "answer": }', GOOD[1]]))
    one_problem(path, f"{path}:2: not valid JSON (Expecting value at column 32)")
    with pytest.raises(DataFileError, match=f"{path}:2: not valid JSON"):
        load_rows(DataSource(path=str(path)))


def test_missing_key_names_file_and_line(tmp_path):
    """Used to be `KeyError: 'question'` after 15 s of start-up."""
    path = tmp_path / "train.jsonl"
    path.write_text(jsonl([GOOD[0], {"problem": "3+4?", "answer": "7"}, GOOD[1], {"question": "5+5?"}]))
    assert check(path) == [f"data.train.path: {path}:2: no key 'question' (keys: problem, answer)",
                           f"data.train.path: {path}:4: no key 'answer' (keys: question)"]
    assert check(path, question_key="problem") == [
        f"data.train.path: {path}:1: no key 'problem' (keys: question, answer)",
        f"data.train.path: {path}:3: no key 'problem' (keys: question, answer)",
        f"data.train.path: {path}:4: no key 'problem' or 'answer' (keys: question)"]
    rows = load_rows(DataSource(path=str(path)))
    with pytest.raises(DataFileError, match=f"{path}: no column 'problem' \\(columns: question, answer\\)"):
        check_columns(str(path), rows, "problem", "answer")


@pytest.mark.parametrize("row,fragment", [
    ([1, 2], "expected a JSON object, found an array"),
    ("just text", "expected a JSON object, found text"),
    ({"question": 7, "answer": "7"}, "'question' is a number; expected text"),
    ({"question": "  ", "answer": "7"}, "'question' is empty"),
    ({"question": "7?", "answer": None}, "'answer' is null"),
    ({"question": "7?", "answer": ""}, "'answer' is empty"),
    ({"question": "7?", "answer": [7]}, "'answer' is an array"),
])
def test_unusable_rows(tmp_path, row, fragment):
    path = tmp_path / "train.jsonl"
    path.write_text(jsonl([GOOD[0], json.dumps(row)]))
    one_problem(path, f"{path}:2: {fragment}")


def test_a_few_bad_rows_are_shown_then_counted(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(jsonl([GOOD[0]] + ["not json"] * 50 + [GOOD[1]]))
    problems = check(path)
    assert problems[:SHOWN] == [f"data.train.path: {path}:{n}: not valid JSON (Expecting value at column 1)"
                                for n in range(2, 2 + SHOWN)]
    assert problems[SHOWN:] == [f"data.train.path: {path}: ... and {50 - SHOWN} more bad rows"]


def test_reading_stops_after_many_bad_rows(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(jsonl(["{"] * (STOP_AFTER * 50)))
    problems = check(path)
    assert len(problems) == SHOWN + 1
    assert problems[-1] == f"data.train.path: {path}: ... and at least {STOP_AFTER - SHOWN} more bad rows"


def test_json_array_reports_rows(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps([GOOD[0], {"question": "x"}, 5, GOOD[1]], indent=1))
    assert check(path) == [f"data.train.path: {path}: row 2: no key 'answer' (keys: question)",
                           f"data.train.path: {path}: row 3: expected a JSON object, found a number"]
    broken = tmp_path / "broken.json"
    broken.write_text('[{"question": "a", "answer": "1"},\n {"question": "b"')
    one_problem(broken, f"{broken}:2: not valid JSON")


def test_json_file_forms_that_load(tmp_path):
    """A .json file may be an array of rows, one object, or JSON Lines."""
    forms = {"array.json": json.dumps(GOOD, indent=2), "lines.json": jsonl(GOOD),
             "one.json": json.dumps(GOOD[0], indent=2)}
    for name, text in forms.items():
        path = tmp_path / name
        path.write_text(text)
        assert check(path) == [], name
        assert load_rows(DataSource(path=str(path))) == (GOOD[:1] if name == "one.json" else GOOD), name


def test_csv_loads_and_reports_lines(tmp_path):
    """An existing .csv used to fail with "couldn't find any data file". Cells are text as written."""
    path = tmp_path / "train.csv"
    path.write_text('question,answer,source\n"Two lines:\n1+1?",2.50,a\n"3,4?",07,b\n')
    assert check(path) == []
    assert load_rows(DataSource(path=str(path))) == [
        {"question": "Two lines:\n1+1?", "answer": "2.50", "source": "a"},
        {"question": "3,4?", "answer": "07", "source": "b"}]
    assert load_rows(DataSource(path=str(path), limit=1)) == load_rows(DataSource(path=str(path)))[:1]

    bad = tmp_path / "bad.csv"
    bad.write_text('question,answer\n"multi\nline",\n\nx,1,2\n,3\nok,4\n')
    assert check(bad) == [f"data.train.path: {bad}:2: 'answer' is empty; expected text or a number",
                          f"data.train.path: {bad}:5: 3 cells; the header has 2",
                          f"data.train.path: {bad}:6: 'question' is empty; expected text"]
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("q,a\nx,1\n")
    one_problem(nocol, "no column 'question' or 'answer' (columns: q, a)")


def test_parquet_rows_and_columns(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"question": ["a?", None, "c?"], "answer": ["1", "2", None], "id": [1, 2, 3]}), path)
    assert check(path) == [f"data.train.path: {path}: row 2: 'question' is null; expected text",
                           f"data.train.path: {path}: row 3: 'answer' is null; expected text or a number"]
    assert load_rows(DataSource(path=str(path), limit=1)) == [{"question": "a?", "answer": "1", "id": 1}]
    assert check(path.with_name("x.parquet")) == [f"data.train.path: file not found: {path.with_name('x.parquet')}"]
    assert data_file_problems("data.eval.path", str(path), "problem", "answer", "gsm8k") == [
        f"data.eval.path: {path}: no column 'problem' (columns: question, answer, id)"]


DAPO = [{"prompt": [{"role": "user", "content": "1+1?"}], "reward_model": {"ground_truth": "2", "style": "rule"}},
        {"prompt": [{"role": "user", "content": "2+3?"}], "reward_model": {"ground_truth": "5", "style": "rule"}}]


def test_nested_keys_in_json_lines(tmp_path):
    """DAPO-Math-17k's layout: the question and the answer inside nested objects."""
    path = tmp_path / "dapo.jsonl"
    path.write_text(jsonl([DAPO[0], {"prompt": [], "reward_model": {"style": "rule"}}, {"prompt": "x"}, DAPO[1],
                           {"prompt": "x", "reward_model": "7"}]))
    assert check(path, "prompt.0.content", "reward_model.ground_truth") == [
        f"data.train.path: {path}:2: 'prompt' is an array of length 0; no '0' in it for 'prompt.0.content'",
        f"data.train.path: {path}:3: no key 'reward_model.ground_truth' (keys: prompt)",
        f"data.train.path: {path}:5: 'prompt' is text; no '0' in it for 'prompt.0.content'"]
    assert check(path, "reward_model.style", "reward_model.ground_truth")[0] == (
        f"data.train.path: {path}:2: no key 'ground_truth' in 'reward_model' (keys: style)")


def test_nested_keys_in_parquet(tmp_path):
    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist([{**row, "extra": "x" * 10} for row in DAPO]), path)
    assert check(path, "prompt.0.content", "reward_model.ground_truth") == []
    assert check(path, "prompt.0.content", "reward_model.answer") == [
        f"data.train.path: {path}: row {n}: no key 'answer' in 'reward_model' (keys: ground_truth, style)"
        for n in (1, 2)]
    assert check(path, "prompt.0.content", "model.ground_truth") == [
        f"data.train.path: {path}: no column 'model.ground_truth' (columns: prompt, reward_model, extra)"]


def test_boxed_answer_format_needs_a_box_in_every_row(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text(jsonl([{"problem": "1+1?", "solution": "so $\\boxed{2}$."},
                           {"problem": "2+3?", "solution": "it is 5"},
                           {"problem": "1/2?", "solution": "\\boxed{\\frac{1}{2}"}]))
    assert check(path, "problem", "solution", "boxed") == [
        f"data.train.path: {path}:{n}: 'solution' has no complete \\boxed{{}} answer (data.answer_format: boxed)"
        for n in (2, 3)]
    assert check(path, "problem", "solution", "raw") == []


def test_load_rows_keeps_values_as_written(tmp_path):
    """`datasets` turned the answer 1 into 1.0 next to 2.5 (reference "1.0"), and failed on a blank
    line between rows of mixed types; the file's own values come back now."""
    path = tmp_path / "train.jsonl"
    path.write_text(jsonl([{"question": "a", "answer": 1}, {"question": "b", "answer": 2.5}, "",
                           {"question": "c", "answer": "3"}]))
    assert check(path) == []
    rows = load_rows(DataSource(path=str(path)))
    assert [r["answer"] for r in rows] == [1, 2.5, "3"] and type(rows[0]["answer"]) is int


def test_limit_reads_only_the_first_rows(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(jsonl([GOOD[0], GOOD[1], "not json"]))
    assert load_rows(DataSource(path=str(path), limit=2)) == GOOD  # the bad third line is never read
    with pytest.raises(DataFileError, match=f"{path}:3"):
        load_rows(DataSource(path=str(path)))


# ---------------------------------------------------------------- the whole recipe

def test_preflight_of_a_recipe(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "train.jsonl").write_text(jsonl([{"problem": "1+1?", "solution": "2"}]))
    (tmp_path / "eval.csv").write_text("problem,solution\n1+1?,\n")
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "name": "t", "model": {"path": str(tmp_path / "model")},
        "data": {"train": {"path": str(tmp_path / "train.jsonl")}, "eval": {"path": str(tmp_path / "eval.csv")}},
        "stages": [{"name": "train", "kind": "rl"}]}))
    recipe = load_recipe(recipe_file)
    assert preflight(recipe) == [
        f"data.train.path: {tmp_path / 'train.jsonl'}:1: no key 'question' or 'answer' (keys: problem, solution)",
        f"data.eval.path: {tmp_path / 'eval.csv'}: no column 'question' or 'answer' (columns: problem, solution)"]
    recipe = load_recipe(recipe_file, ["data.question_key=problem", "data.answer_key=solution"])
    assert preflight(recipe) == [f"data.eval.path: {tmp_path / 'eval.csv'}:2: 'solution' is empty; "
                                 "expected text or a number"]
    recipe = load_recipe(recipe_file, ["data.question_key=problem", "data.answer_key=solution",
                                       "data.answer_format=boxed", f"data.eval.path={tmp_path / 'train.jsonl'}"])
    assert preflight(recipe) == [f"data.{split}.path: {tmp_path / 'train.jsonl'}:1: 'solution' has no complete "
                                 "\\boxed{} answer (data.answer_format: boxed)" for split in ("train", "eval")]
    recipe = load_recipe(recipe_file, ["data.question_key=problem", "data.answer_key=solution",
                                       f"model.path={tmp_path / 'nothing'}", f"data.eval.path={tmp_path / 'train.jsonl'}"])
    assert preflight(recipe) == [f"model.path: no Hugging Face model folder (config.json) at {tmp_path / 'nothing'}"]


def test_an_eval_stages_held_out_text_is_checked_before_the_run(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "data.jsonl").write_text(jsonl(GOOD))
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "name": "t", "model": {"path": str(tmp_path / "model")},
        "data": {"train": {"path": str(tmp_path / "data.jsonl")}, "eval": {"path": str(tmp_path / "data.jsonl")}},
        "stages": [{"name": "eval", "kind": "eval"}]}))

    def problems(held_out: Path) -> list[str]:
        return preflight(load_recipe(recipe_file, [f"stages.eval.perplexity_data={held_out}"]))

    assert problems(tmp_path / "gone.txt") == [f"stages.eval.perplexity_data: file not found: {tmp_path / 'gone.txt'}"]
    assert problems(tmp_path / "data.parquet") == [
        f"stages.eval.perplexity_data: {tmp_path / 'data.parquet'} is neither a .txt nor a .jsonl file"]
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert problems(tmp_path / "empty.txt") == [f"stages.eval.perplexity_data: {tmp_path / 'empty.txt'}: is empty"]
    (tmp_path / "held.jsonl").write_text(jsonl([{"text": "fine"}, {"body": "x"}, "not json", {"text": ""}]))
    assert problems(tmp_path / "held.jsonl") == [
        f"stages.eval.perplexity_data: {tmp_path / 'held.jsonl'}:2: no key 'text' (keys: body)",
        f"stages.eval.perplexity_data: {tmp_path / 'held.jsonl'}:3: not valid JSON (Expecting value at column 1)",
        f"stages.eval.perplexity_data: {tmp_path / 'held.jsonl'}:4: no text in 'text'"]
    (tmp_path / "held.txt").write_text("A held-out document.\n")
    assert problems(tmp_path / "held.txt") == []
