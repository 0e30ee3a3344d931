"""A bad recipe fails before anything starts: exit 2, one `error: <field path>: ...` line per
problem, never a traceback. Good recipes validate, and the printed recipe re-loads to the same one.

Most cases call `launch.cli.main` in-process (fast); the `cli_runs` fixture runs a sample of them,
and `prunerl run` on bad recipes, through the real command line in parallel subprocesses.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch.cli import EXIT_BAD_RECIPE, main
from launch.config import RecipeError, dump_recipe, load_recipe, parse_overrides
from launch.schema import STAGE_TYPES, Recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"

# Hub names only: no file on disk is needed, so preflight has nothing to complain about.
BASE = {
    "name": "t",
    "model": {"path": "Qwen/Qwen2.5-0.5B-Instruct"},
    "data": {"train": {"path": "openai/gsm8k", "config": "main"},
             "eval": {"path": "openai/gsm8k", "config": "main", "split": "test"}},
    "stages": [{"name": "train", "kind": "rl"},
               {"name": "eval", "kind": "eval", "needs": ["train"]}],
}


def _set(tree: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = tree
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    node[int(last) if isinstance(node, list) else last] = value
    return tree


def _del(tree: dict, dotted: str) -> dict:
    *parents, last = dotted.split(".")
    node = tree
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    del node[last]
    return tree


def recipe_tree(*edits) -> dict:
    """BASE with edits applied: ("path", value) sets, ("path",) deletes."""
    tree = copy.deepcopy(BASE)
    for edit in edits:
        _set(tree, *edit) if len(edit) == 2 else _del(tree, *edit)
    return tree


def write(directory: Path, content, name: str = "recipe.yaml") -> Path:
    path = directory / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    return path


def error_lines(stderr: str) -> list[str]:
    return [line.removeprefix("error: ") for line in stderr.splitlines() if line.startswith("error: ")]


def assert_errors(rc: int, stderr: str, expected: list[tuple[str, str]]) -> None:
    """Exit 2; exactly one `error:` line per expected (field path, message fragment), in order."""
    assert "Traceback" not in stderr, stderr
    assert rc == EXIT_BAD_RECIPE, stderr
    lines = error_lines(stderr)
    assert len(lines) == len(expected), f"expected {len(expected)} error lines, got:\n{stderr}"
    for line, (path, fragment) in zip(lines, expected):
        where, sep, what = line.partition(": ")
        assert sep and where == path, f"expected field path {path!r} in: {line}"
        assert fragment.lower() in what.lower(), f"expected {fragment!r} in: {line}"


def validate(capsys, recipe: Path | str, *overrides: str) -> tuple[int, str, str]:
    rc = main(["validate", str(recipe), *overrides])
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------- malformed recipes

SCHEMA_CASES = {
    "unknown top-level key": (recipe_tree(("epochs", 3)), [("epochs", "unknown key")]),
    "unknown nested key": (recipe_tree(("stages.0.loss.clip", 0.2)), [("stages.train.loss.clip", "unknown key")]),
    "typo in a section key": (recipe_tree(("model.dtyp", "float32")), [("model.dtyp", "unknown key")]),
    "wrong type: text for int": (recipe_tree(("stages.0.group_size", "eight")),
                                 [("stages.train.group_size", "valid integer")]),
    "wrong type: value for section": (recipe_tree(("stages.0.loss", 3)), [("stages.train.loss", "dictionary")]),
    "wrong type: text for bool": (recipe_tree(("stages.0.loss.mask_truncated", "sometimes")),
                                  [("stages.train.loss.mask_truncated", "boolean")]),
    "wrong type: needs is not a list": (recipe_tree(("stages.1.needs", "train")),
                                        [("stages.eval.needs", "valid list")]),
    "group_size below 2": (recipe_tree(("stages.0.group_size", 1)),
                           [("stages.train.group_size", "greater than or equal to 2")]),
    "negative steps": (recipe_tree(("stages.0.steps", -3)), [("stages.train.steps", "greater than or equal to 1")]),
    "zero engines": (recipe_tree(("stages.0.rollout.engines", 0)),
                     [("stages.train.rollout.engines", "greater than or equal to 1")]),
    "zero reward workers": (recipe_tree(("stages.0.rewards.workers", 0)),
                            [("stages.train.rewards.workers", "greater than or equal to 1")]),
    "top_p 1.5": (recipe_tree(("stages.0.rollout.top_p", 1.5)),
                  [("stages.train.rollout.top_p", "less than or equal to 1")]),
    "eps_low 1.0": (recipe_tree(("stages.0.loss.eps_low", 1.0)), [("stages.train.loss.eps_low", "less than 1")]),
    "negative lr": (recipe_tree(("stages.0.learner.optim.lr", -1e-6)),
                    [("stages.train.learner.optim.lr", "greater than 0")]),
    "bad loss.agg": (recipe_tree(("stages.0.loss.agg", "mean")), [("stages.train.loss.agg", "'dapo'")]),
    "bad algorithm": (recipe_tree(("stages.0.algorithm", "ppo")), [("stages.train.algorithm", "'grpo'")]),
    "bad zero_stage": (recipe_tree(("stages.0.learner.zero_stage", 4)),
                       [("stages.train.learner.zero_stage", "0, 1, 2 or 3")]),
    "bad verifier in a list": (recipe_tree(("stages.0.rewards.terms", [{"verifier": "bleu"}])),
                               [("stages.train.rewards.terms.0.verifier", "gsm8k_accuracy")]),
    "option of another verifier": (recipe_tree(("stages.0.rewards.terms", [{"verifier": "format", "exact_score": 2}])),
                                   [("stages.train.rewards.terms.0", "verifier 'format' takes no option exact_score")]),
    "format pattern that is no regex": (recipe_tree(("stages.0.rewards.terms", [{"verifier": "format", "pattern": "(("}])),
                                        [("stages.train.rewards.terms.0", "not a valid regular expression")]),
    "a verifier twice": (recipe_tree(("stages.0.rewards.terms", [{"verifier": "format"}, {"verifier": "format"}])),
                         [("stages.train.rewards.terms", "repeated: format")]),
    "option of boxed_format": (recipe_tree(("stages.0.rewards.terms", [{"verifier": "boxed_format", "exact_score": 2}])),
                               [("stages.train.rewards.terms.0", "verifier 'boxed_format' takes no option exact_score")]),
    "accuracy not among the terms": (
        recipe_tree(("stages.0.rewards.terms", [{"verifier": "boxed_accuracy"}, {"verifier": "boxed_format"}]),
                    ("stages.0.rewards.accuracy", "gsm8k_accuracy")),
        [("stages.train.rewards.accuracy",
          "'gsm8k_accuracy' is not the verifier of a term; the terms' verifiers are boxed_accuracy, boxed_format")]),
    "accuracy of the default terms": (recipe_tree(("stages.0.rewards.accuracy", "boxed_accuracy")),
                                      [("stages.train.rewards.accuracy", "the terms' verifiers are gsm8k_accuracy")]),
    "eval accuracy that is no accuracy verifier": (recipe_tree(("stages.1.accuracy", "format")),
                                                   [("stages.eval.accuracy", "'boxed_accuracy'")]),
    "bad answer_format": (recipe_tree(("data.answer_format", "latex")), [("data.answer_format", "'boxed' or 'raw'")]),
    "bad stage kind": (recipe_tree(("stages.0.kind", "sft")),
                       [("stages.train.kind", "unknown stage kind 'sft'; expected one of 'rl', 'sparsify', 'quantize', 'distill', 'eval'")]),
    "stage without kind": (recipe_tree(("stages.0.kind",)), [("stages.train.kind", "needs a `kind`")]),
    "error in the second stage kind": (recipe_tree(("stages.1.max_new_tokens", 0)),
                                       [("stages.eval.max_new_tokens", "greater than or equal to 1")]),
    "bad stage name is named by index": (recipe_tree(("stages.0.name", "my train"), ("stages.1.needs", [])),
                                         [("stages.0.name", "'my train' is not a usable folder name")]),
    "missing model": (recipe_tree(("model",)), [("model", "required field is missing")]),
    "missing data": (recipe_tree(("data",)), [("data", "required field is missing")]),
    "missing data.train": (recipe_tree(("data.train",)), [("data.train", "required field is missing")]),
    "missing stages": (recipe_tree(("stages",)), [("stages", "required field is missing")]),
    "missing name": (recipe_tree(("name",)), [("name", "required field is missing")]),
    "empty stages": (recipe_tree(("stages", [])), [("stages", "at least 1 item")]),
    "duplicate stage names": (recipe_tree(("stages.1.name", "train"), ("stages.1.needs", [])),
                              [("stages.train.name", "duplicate stage name (stages 0 and 1)")]),
    "needs an unknown stage": (recipe_tree(("stages.1.needs", ["trian"])),
                               [("stages.eval.needs", "unknown stage 'trian'")]),
    "needs itself": (recipe_tree(("stages.1.needs", ["train", "eval"])),
                     [("stages.eval.needs", "cannot need itself")]),
    "dependency cycle": (recipe_tree(("stages.0.needs", ["eval"])), [("stages", "cycle: eval, train")]),
    "two graph problems, two lines": (recipe_tree(("stages.0.needs", ["x"]), ("stages.1.needs", ["y"])),
                                      [("stages.train.needs", "unknown stage 'x'"),
                                       ("stages.eval.needs", "unknown stage 'y'")]),
    "template without {question}": (recipe_tree(("data.template", "Q: {q}")), [("data.template", "{question}")]),
    "unknown selection method": (recipe_tree(("stages.0.selection", {"completions": {"method": "topk"}})),
                                 [("stages.train.selection.completions.method",
                                   "unknown method 'topk'; expected one of 'all', 'cppo', 'dppo'")]),
    "cppo option under grpo": (recipe_tree(("stages.0.selection", {"completions": {"rate": 0.5}})),
                               [("stages.train.selection.completions.rate", "unknown key")]),
    "cppo rate 1": (recipe_tree(("stages.0.algorithm", "cppo"), ("stages.0.selection", {"completions": {"rate": 1.0}})),
                    [("stages.train.selection.completions.rate", "less than 1")]),
    "cppo group rule with a fractional group": (
        recipe_tree(("stages.0.algorithm", "cppo"), ("stages.0.group_size", 6),
                    ("stages.0.selection", {"completions": {"rate": 0.75, "rule": "group"}})),
        [("stages.train", "G*(1-P) = 6*0.25 = 1.5 completions per prompt")]),
    "dppo rate over its cap": (
        recipe_tree(("stages.0.algorithm", "dppo"), ("stages.0.selection", {"prompts": {"rate": 0.8, "max_prob": 0.7}})),
        [("stages.train.selection", "dppo rate (0.8) must not exceed max_prob (0.7)")]),
    "dppo with bnpo": (recipe_tree(("stages.0.algorithm", "dppo"), ("stages.0.loss.agg", "bnpo")),
                       [("stages.train", "'bnpo' normalises each micro-batch")]),
    "top_p with mismatch correction": (
        recipe_tree(("stages.0.rollout.top_p", 0.9), ("stages.0.loss.mismatch", {"mode": "tis"})),
        [("stages.train", "rollout.top_p < 1 with loss.mismatch")]),
    "bad packing mode": (recipe_tree(("stages.0.packing.mode", "tight")), [("stages.train.packing.mode", "'dense'")]),
    "mismatch c_min >= c_max": (recipe_tree(("stages.0.loss.mismatch", {"mode": "tis", "c_min": 2.0, "c_max": 2.0})),
                                [("stages.train.loss.mismatch", "c_min (2.0) must be below c_max (2.0)")]),
    "several problems, one line each": (
        recipe_tree(("epochs", 3), ("model.dtype", "fp8"), ("data.template", "Q:"), ("stages.1.needs", ["nope"])),
        [("model.dtype", "'bfloat16'"), ("data.template", "{question}"),
         ("stages.eval.needs", "unknown stage 'nope'"), ("epochs", "unknown key")]),
    # Numbers that cannot train: NaN and infinity are errors in every float field.
    "infinite temperature": (recipe_tree(("stages.0.rollout.temperature", float("inf"))),
                             [("stages.train.rollout.temperature", "finite number")]),
    "NaN reward weight": (recipe_tree(("stages.0.rewards.terms", [{"verifier": "gsm8k_accuracy", "weight": float("nan")}])),
                          [("stages.train.rewards.terms.0.weight", "finite number")]),
    "NaN in a tuple (betas)": (recipe_tree(("stages.0.learner.optim.betas", [float("nan"), 0.999])),
                               [("stages.train.learner.optim.betas.0", "finite number")]),
    "-inf timeout": (recipe_tree(("cluster.liveness", {"call_timeout_s": float("-inf")})),
                     [("cluster.liveness.call_timeout_s", "finite number")]),
    "beta of 1": (recipe_tree(("stages.0.learner.optim.betas", [0.9, 1.0])),
                  [("stages.train.learner.optim.betas.1", "less than 1")]),
    "negative seed": (recipe_tree(("seed", -1)), [("seed", "greater than or equal to 0")]),
    "huge seed": (recipe_tree(("seed", 2**70)), [("seed", "less than 2147483648")]),
    # Names become folders: `<run_root>/<name>-<timestamp>` and `<run dir>/<stage name>`.
    "stage named like the run dir's recipe.yaml": (
        recipe_tree(("stages.0.name", "recipe.yaml"), ("stages.1.needs", [])),
        [("stages.0.name", "'recipe.yaml' would clash with the run directory's own recipe.yaml")]),
    "stage named Checkpoints (any case)": (
        recipe_tree(("stages.0.name", "Checkpoints"), ("stages.1.needs", [])),
        [("stages.0.name", "clash with the run directory's own checkpoints")]),
    "hidden stage name": (recipe_tree(("stages.0.name", ".hidden"), ("stages.1.needs", [])),
                          [("stages.0.name", "'.hidden' is not a usable folder name")]),
    "stage name over 64 characters": (recipe_tree(("stages.0.name", "s" * 65), ("stages.1.needs", [])),
                                      [("stages.0.name", "65 characters long; a name has at most 64")]),
    "recipe name with a slash": (recipe_tree(("name", "../elsewhere")), [("name", "not a usable folder name")]),
    "recipe name over 64 characters": (recipe_tree(("name", "n" * 300)), [("name", "300 characters long")]),
    # Step-GRPO
    "step reward without an accuracy term": (
        recipe_tree(("stages.0.rewards", {"terms": [{"verifier": "boxed_format"}], "step_aware": {"beta": 0.5}})),
        [("stages.train.rewards", "step_aware scales the accuracy term")]),
    "truncation budget of the whole response": (recipe_tree(("stages.0.rollout.truncation.think_budget", 1.0)),
                                                [("stages.train.rollout.truncation.think_budget", "less than 1")]),
    "no step triggers": (recipe_tree(("stages.0.step_triggers", [])), [("stages.train.step_triggers", "at least 1")]),
    # The graph is checked once every stage is valid on its own, so only the field errors show here.
    "several problems in one stage": (
        recipe_tree(("stages.0.rollout.top_p", 1.5), ("stages.0.loss.agg", "mean"), ("stages.1.needs", ["nope"])),
        [("stages.train.loss.agg", "'grpo'"), ("stages.train.rollout.top_p", "less than or equal to 1")]),
}


@pytest.mark.parametrize("case", list(SCHEMA_CASES))
def test_malformed_recipe(case, tmp_path, capsys):
    tree, expected = SCHEMA_CASES[case]
    rc, out, err = validate(capsys, write(tmp_path, tree))
    assert out == ""
    assert_errors(rc, err, expected)


def test_base_recipe_is_valid(tmp_path, capsys):
    """Each malformed case is BASE plus one breakage; BASE itself must pass, or they prove nothing."""
    rc, out, err = validate(capsys, write(tmp_path, BASE))
    assert (rc, err) == (0, "")
    assert Recipe.model_validate(yaml.safe_load(out)) == Recipe.model_validate(BASE)


FILE_CASES = {
    "list, not a mapping": ("- name: t\n- stages: []\n", "a recipe is a YAML mapping"),
    "scalar": ("just some text\n", "a recipe is a YAML mapping"),
    "empty file": ("", "a recipe is a YAML mapping"),
    "invalid YAML syntax": ("name: t\nstages: [{name: train, kind: rl}\nmodel: x\n", "not valid YAML (line 3"),
    "tab indentation": ("name: t\n\tmodel: x\n", "not valid YAML (line 2, column 1)"),
    "not text": (b"\xff\xfe\x00\x01name", "cannot read the recipe"),
    # PyYAML composes recursively: 5,000 levels used to print a 3,000-line RecursionError.
    # The recipe is level 1, so the mapping opened on the key's line L + k is level k + 1: level 33 is on line L + 32.
    "5,000 nested mappings": (yaml.safe_dump(BASE) + "".join("  " * i + "a:\n" for i in range(5000)) + "  " * 5000
                              + "b: 1\n", f"nested deeper than 32 levels (line {len(yaml.safe_dump(BASE).splitlines()) + 32})"),
    "5,000 nested flow lists": (yaml.safe_dump(BASE) + "x: " + "[" * 5000 + "]" * 5000 + "\n", "nest"),
    "33 nested lists": (yaml.safe_dump(BASE) + "x: " + "[" * 33 + "]" * 33 + "\n", "nested deeper than 32 levels"),
    "an alias inside its own anchor": (yaml.safe_dump(BASE) + "x: &loop [1, *loop]\n", "contain itself"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_malformed_file(case, tmp_path, capsys):
    content, fragment = FILE_CASES[case]
    path = write(tmp_path, content)
    rc, out, err = validate(capsys, path)
    assert_errors(rc, err, [(str(path), fragment)])


def test_nesting_bound_is_exact(tmp_path, capsys):
    """The recipe, 30 lists and their scalar are 32 levels: they reach the schema; one list more does not."""
    rc, _, err = validate(capsys, write(tmp_path, yaml.safe_dump(BASE) + "x: " + "[" * 30 + "1" + "]" * 30 + "\n"))
    assert_errors(rc, err, [("x", "unknown key")])
    path = write(tmp_path, yaml.safe_dump(BASE) + "x: " + "[" * 31 + "1" + "]" * 31 + "\n")
    rc, _, err = validate(capsys, path)
    assert_errors(rc, err, [(str(path), "nested deeper than 32 levels")])


def test_deep_override_is_one_line(tmp_path, capsys):
    rc, _, err = validate(capsys, write(tmp_path, BASE), "a." * 100 + "b=1")
    assert_errors(rc, err, [(str(tmp_path / "recipe.yaml"), "nested 102 levels deep with its overrides")])
    rc, _, err = validate(capsys, write(tmp_path, BASE), "x=" + "[" * 40 + "]" * 40)
    assert_errors(rc, err, [("x", "nested deeper than 32 levels")])


def test_many_problems_are_capped(tmp_path, capsys):
    """200,000 unknown keys used to print 200,000 lines: now the first 20, then a count."""
    text = yaml.safe_dump(BASE) + "".join(f"k{i}: 0\n" for i in range(200_000))
    rc, out, err = validate(capsys, write(tmp_path, text))
    assert "Traceback" not in err and rc == EXIT_BAD_RECIPE and out == ""
    lines = error_lines(err)
    assert lines[:20] == [f"k{i}: unknown key" for i in range(20)]
    assert lines[20:] == ["... and 199980 more problems"]
    assert len(err) < 1000


def test_echoed_values_are_cut_short(tmp_path, capsys):
    long = "q" * 100_000
    rc, _, err = validate(capsys, write(tmp_path, recipe_tree(("stages.0.kind", long), (long, 1))),
                          f"stages.eval.needs=[{long}]", f"stages.{long}.steps=1")
    assert "Traceback" not in err and rc == EXIT_BAD_RECIPE
    assert err.count("error: ") == 1 and len(err) < 300  # the override's unknown stage is the first problem
    rc, _, err = validate(capsys, write(tmp_path, recipe_tree(("stages.0.kind", long), (long, 1))))
    assert_errors(rc, err, [("stages.train.kind", "unknown stage kind 'qqqq"), ("q" * 37 + "...", "unknown key")])
    assert max(len(line) for line in err.splitlines()) < 200


def test_format_pattern_is_checked_with_the_regex_module(tmp_path):
    """The format verifier runs patterns with `regex` (it has timeouts), so validation uses it too:
    these are valid for `regex` and rejected by `re`."""
    for pattern in [r"(?<=a|bc)x", r"\p{L}+"]:
        recipe = load_recipe(write(tmp_path, recipe_tree(
            ("stages.0.rewards.terms", [{"verifier": "format", "pattern": pattern}]))))
        assert recipe.stages[0].rewards.terms[0].pattern == pattern


@pytest.mark.parametrize("terms, accuracy", [
    ([{"verifier": "format"}, {"verifier": "boxed_accuracy"}, {"verifier": "gsm8k_accuracy"}], "boxed_accuracy"),
    ([{"verifier": "gsm8k_accuracy"}, {"verifier": "boxed_format"}], "gsm8k_accuracy"),
    ([{"verifier": "format"}, {"verifier": "boxed_format"}], None),
])
def test_accuracy_defaults_to_the_first_accuracy_term(tmp_path, capsys, terms, accuracy):
    path = write(tmp_path, recipe_tree(("stages.0.rewards.terms", terms)))
    recipe = load_recipe(path)
    assert recipe.stages[0].rewards.accuracy == accuracy
    assert recipe.stages[1].accuracy == (accuracy or "gsm8k_accuracy")  # the eval stage judges like the rl stage
    rc, out, err = validate(capsys, path)
    assert (rc, err) == (0, "")
    assert yaml.safe_load(out)["stages"][0]["rewards"]["accuracy"] == accuracy  # the resolved recipe names it
    chosen = load_recipe(path, ["stages.train.rewards.accuracy=" + terms[-1]["verifier"]])
    assert chosen.stages[0].rewards.accuracy == terms[-1]["verifier"]


def test_non_finite_override(tmp_path, capsys):
    for value in (".inf", "-.inf", ".nan", "1e400", "nan"):
        rc, _, err = validate(capsys, write(tmp_path, BASE), f"stages.train.learner.optim.lr={value}")
        assert_errors(rc, err, [("stages.train.learner.optim.lr", "finite number")])


def test_missing_recipe_file(tmp_path, capsys):
    path = tmp_path / "nope.yaml"
    rc, _, err = validate(capsys, path)
    assert_errors(rc, err, [(str(path), "no such recipe file")])
    rc, _, err = validate(capsys, tmp_path)  # a folder is not a recipe file either
    assert_errors(rc, err, [(str(tmp_path), "no such recipe file")])


OVERRIDE_CASES = {
    "no '='": (["stages.train.steps"], [("stages.train.steps", "key.path=value")]),
    "no key": (["=3"], [("=3", "key.path=value")]),
    "unknown key": (["stages.train.loss.clip=0.1"], [("stages.train.loss.clip", "unknown key")]),
    "unknown top-level section": (["trainer.steps=3"], [("trainer", "unknown key")]),
    "non-existent stage name": (["stages.trian.steps=3"], [("stages.trian", "no list item named or numbered 'trian'")]),
    "stage index out of range": (["stages.7.steps=3"], [("stages.7", "no list item named or numbered '7'")]),
    "into a value": (["name.suffix=x"], [("name.suffix", "'name' is a value, not a section")]),
    "value of the wrong type": (["stages.train.steps=many"], [("stages.train.steps", "valid integer")]),
    "value out of range": (["stages.train.rollout.top_p=1.5"],
                           [("stages.train.rollout.top_p", "less than or equal to 1")]),
    "value that is not YAML": (["stages.train.steps=[1"], [("stages.train.steps", "is not valid YAML")]),
    "two bad overrides, two lines": (["stages.trian.steps=3", "model.path.x=1"],
                                     [("stages.trian", "no list item"),
                                      ("model.path.x", "'model.path' is a value, not a section")]),
    "an override that makes a cycle": (["stages.train.needs=[eval]"], [("stages", "cycle")]),
}


@pytest.mark.parametrize("case", list(OVERRIDE_CASES))
def test_bad_override(case, tmp_path, capsys):
    overrides, expected = OVERRIDE_CASES[case]
    rc, out, err = validate(capsys, write(tmp_path, BASE), *overrides)
    assert_errors(rc, err, expected)


def test_preflight_local_files(tmp_path, capsys):
    """Schema-valid recipes whose local model folder or data files are missing fail before any actor."""
    recipe = write(tmp_path, recipe_tree(("model.path", str(tmp_path / "no-model")),
                                         ("data.train.path", str(tmp_path / "train.jsonl")),
                                         ("data.eval.path", str(tmp_path / "eval.parquet"))))
    rc, _, err = validate(capsys, recipe)
    assert_errors(rc, err, [("model.path", "config.json"), ("data.train.path", "file not found"),
                            ("data.eval.path", "file not found")])

    (tmp_path / "model").mkdir()  # a folder without config.json is not a model either
    (tmp_path / "train.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    rc, _, err = validate(capsys, recipe, f"model.path={tmp_path / 'model'}")
    assert_errors(rc, err, [("model.path", "config.json"), ("data.eval.path", "file not found")])

    (tmp_path / "model" / "config.json").write_text("{}")
    rc, out, err = validate(capsys, recipe, f"model.path={tmp_path / 'model'}",
                            f"data.eval.path={tmp_path / 'train.jsonl'}")
    assert (rc, err) == (0, "")
    assert yaml.safe_load(out)["model"]["path"] == str(tmp_path / "model")


# ---------------------------------------------------------------- the real command line

def _cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "launch", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Runs a sample of the cases above through `python -m launch`, all at once; returns
    {case: (returncode, stdout, stderr, tmp folder)}."""
    jobs = {}

    def start(case, make_args, cwd=REPO, env=None):
        d = tmp_path_factory.mktemp(case.replace(" ", "-"))
        args, env_extra = make_args(d)
        jobs[case] = (_cli(args, cwd if cwd is not None else d, {**(env or {}), **env_extra}), d)

    several = SCHEMA_CASES["several problems, one line each"][0]
    start("several problems", lambda d: (["validate", str(write(d, several))], {}))
    start("override not YAML", lambda d: (["validate", str(write(d, BASE)), "stages.train.steps=[1"], {}))
    start("run bad recipe", lambda d: (["run", str(write(d, several)), "--run-dir", str(d / "run")],
                                       {"RAY_TMPDIR": str(d / "ray")}))
    # Schema-valid, preflight fails; no --run-dir, so a started run would create runs/ in cwd.
    start("run missing model", lambda d: (["run", str(write(d, recipe_tree(("model.path", "./no-model"))))],
                                          {"RAY_TMPDIR": str(d / "ray")}), cwd=None)
    start("validate shipped", lambda d: (["validate", "recipes/grpo_gsm8k.yaml",
                                          "stages.train.loss.kl_coef=0.08", "stages.1.max_new_tokens=32"], {}))
    results = {}
    for case, (proc, d) in jobs.items():
        out, err = proc.communicate(timeout=120)
        results[case] = (proc.returncode, out, err, d)
    return results


def test_cli_subprocess_reports_errors_without_traceback(cli_runs):
    rc, out, err, _ = cli_runs["several problems"]
    assert_errors(rc, err, SCHEMA_CASES["several problems, one line each"][1])
    assert out == ""
    rc, _, err, _ = cli_runs["override not YAML"]
    assert_errors(rc, err, [("stages.train.steps", "not valid YAML")])


def test_run_on_a_bad_recipe_starts_nothing(cli_runs):
    rc, out, err, d = cli_runs["run bad recipe"]
    assert_errors(rc, err, SCHEMA_CASES["several problems, one line each"][1])
    assert not (d / "run").exists(), "a bad recipe must not create its run directory"
    assert not (d / "ray").exists(), "a bad recipe must not start Ray"
    assert "run directory" not in out

    rc, out, err, d = cli_runs["run missing model"]
    assert_errors(rc, err, [("model.path", "config.json")])
    assert not (d / "runs").exists(), "a recipe failing preflight must not create runs/"
    assert not (d / "ray").exists(), "a recipe failing preflight must not start Ray"
    assert "run directory" not in out


def test_cli_validate_prints_the_resolved_recipe(cli_runs):
    rc, out, err, d = cli_runs["validate shipped"]
    assert (rc, err) == (0, ""), err
    printed = write(d, out, "printed.yaml")
    expected = load_recipe(RECIPES / "grpo_gsm8k.yaml",
                           ["stages.train.loss.kl_coef=0.08", "stages.1.max_new_tokens=32"])
    assert load_recipe(printed) == expected
    tree = yaml.safe_load(out)
    assert tree["stages"][0]["loss"]["kl_coef"] == 0.08
    assert tree["stages"][1]["max_new_tokens"] == 32
    assert tree["stages"][0]["rollout"]["top_p"] == 1.0  # defaults are filled in


# ---------------------------------------------------------------- valid recipes and overrides

@pytest.mark.parametrize("name", ["quickstart", "grpo_gsm8k", "grpo_gsm8k_7b", "step_grpo_math", "step_grpo_quickstart"])
def test_shipped_recipe_validates_and_round_trips(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # quickstart's paths are relative to the repo root, preflight checks them
    path = RECIPES / f"{name}.yaml"
    rc, out, err = validate(capsys, path)
    assert (rc, err) == (0, ""), err
    original = load_recipe(path)
    printed = write(tmp_path, out, "printed.yaml")
    assert load_recipe(printed) == original
    rc, again, err = validate(capsys, printed)
    assert (rc, again) == (0, out), "the printed recipe must be a fixed point of validate"
    assert original.name == name


def test_overrides_by_stage_name_and_index(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE), [
        "stages.train.loss.agg=dapo",           # by name
        "stages.1.max_new_tokens=32",           # by index
        "stages.0.loss.mismatch.mode=tis",      # a section the YAML does not mention
        "stages.eval.needs=[]",                 # a YAML list
        'data.template="Q: {question} A:"',     # a quoted string with ': '
        "model.path=Qwen/Qwen2.5-1.5B-Instruct",
    ])
    train, ev = recipe.stages
    assert train.loss.agg == "dapo" and ev.max_new_tokens == 32
    assert train.loss.mismatch.mode == "tis" and train.loss.mismatch.c_max == 3.0
    assert ev.needs == []
    assert recipe.data.template == "Q: {question} A:"
    assert recipe.model.path == "Qwen/Qwen2.5-1.5B-Instruct"
    assert BASE["stages"][1]["needs"] == ["train"]  # overrides do not leak into the caller's data


def test_override_values_are_typed_as_yaml(tmp_path):
    assert parse_overrides(["a=0.04", "b=10", "c=true", "d=null", "e=[1, 2]", "f=text", "g='10'", "h="]) == [
        ("a", 0.04), ("b", 10), ("c", True), ("d", None), ("e", [1, 2]), ("f", "text"), ("g", "10"), ("h", "")]
    recipe = load_recipe(RECIPES / "grpo_gsm8k.yaml",
                         ["stages.train.loss.kl_coef=0.04", "stages.train.steps=10", "data.train.limit=null"])
    kl, steps = recipe.stages[0].loss.kl_coef, recipe.stages[0].steps
    assert type(kl) is float and kl == 0.04
    assert type(steps) is int and steps == 10
    assert recipe.data.train.limit is None


def test_override_of_a_whole_value_replaces_it(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE), ["stages.train.rewards.terms=[{verifier: format, weight: 0.5}]"])
    (term,) = recipe.stages[0].rewards.terms
    assert (term.verifier, term.weight) == ("format", 0.5)


def test_recipe_error_lists_every_problem(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, SCHEMA_CASES["several problems, one line each"][0]))
    assert len(info.value.problems) == 4
    assert str(info.value) == "\n".join(info.value.problems)


def test_dump_recipe_is_plain_yaml(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE))
    text = dump_recipe(recipe)
    assert "!!python" not in text
    assert Recipe.model_validate(yaml.safe_load(text)) == recipe


# ---------------------------------------------------------------- the generated reference

REGENERATE = "python docs/gen_recipe_reference.py"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_recipe_reference", REPO / "docs" / "gen_recipe_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_reference_is_up_to_date():
    committed = (REPO / "docs" / "recipe-reference.md").read_text()
    assert committed == _generator().render(), (
        f"docs/recipe-reference.md is stale or edited by hand; regenerate it with: {REGENERATE}")


def test_recipe_reference_covers_every_field_and_stage_kind():
    text = _generator().render()
    for cls in STAGE_TYPES:  # the registry, independently of how the generator walks the union
        kind = cls.model_fields["kind"].default
        assert f"### kind `{kind}` ({cls.__name__})" in text
        for field in cls.model_fields:
            assert f"| `stages.<name>.{field}` |" in text, f"{kind}.{field}"
    for path in ["name", "seed", "model.path", "data.train.limit", "data.template", "cluster.num_cpus",
                 "logging.wandb.mode", "stages.<name>.loss.agg", "stages.<name>.loss.mismatch.c_max",
                 "stages.<name>.learner.optim.lr", "stages.<name>.rewards.terms[].verifier"]:
        assert f"| `{path}` |" in text, path
    agg = next(line for line in text.splitlines() if line.startswith("| `stages.<name>.loss.agg` |"))
    assert '`"dr_grpo"`' in agg and '`"grpo"`' in agg  # type lists the choices, default is grpo
    top_p = next(line for line in text.splitlines() if line.startswith("| `stages.<name>.rollout.top_p` |"))
    assert "> 0" in top_p and "<= 1" in top_p and "| `1.0` |" in top_p
