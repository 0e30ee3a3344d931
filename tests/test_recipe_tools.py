"""`prunerl ls | cp | schema`: the shipped recipes and the recipe JSON schema editors validate against."""
from __future__ import annotations

import copy
import json

import pytest
import yaml
from jsonschema import Draft202012Validator

from launch.cli import main
from launch.config import RecipeError, load_recipe
from launch.recipe_tools import PACKAGE_ROOT, SCHEMA_COMMENT, SCHEMA_FILE, schema_text, shipped_recipes

SHIPPED = shipped_recipes()


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(SCHEMA_FILE.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def test_ls_lists_every_shipped_recipe_with_its_stages(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for name in SHIPPED:
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert "invalid" not in line
    assert "quickstart            CPU    grpo,eval" in out
    assert any(line.startswith("cppo_gsm8k ") and "2 GPU" in line and "cppo,eval" in line for line in out.splitlines())
    assert any(line.startswith("step_grpo_quickstart ") and "step_grpo,eval" in line for line in out.splitlines())


def test_cp_elsewhere_rewrites_shipped_paths_and_the_copy_validates(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["cp", "quickstart", "mine.yaml"]) == 0
    text = (tmp_path / "mine.yaml").read_text()
    assert f"path: {PACKAGE_ROOT}/recipes/assets/tiny-qwen2\n" in text
    assert f"$schema={SCHEMA_FILE}" in text
    assert "# GRPO on the shipped tiny Qwen2 policy" in text  # comments are kept
    capsys.readouterr()
    # `validate` runs preflight, which opens the model and data files: they resolve from here.
    assert main(["validate", "mine.yaml"]) == 0
    assert "name: quickstart" in capsys.readouterr().out


def test_cp_in_the_repo_keeps_relative_paths_and_into_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(PACKAGE_ROOT)
    assert main(["cp", "cppo_quickstart.yaml", str(tmp_path)]) == 0
    text = (tmp_path / "cppo_quickstart.yaml").read_text()
    assert "path: recipes/assets/tiny-qwen2\n" in text
    assert load_recipe(tmp_path / "cppo_quickstart.yaml").stages[0].algorithm == "cppo"


def test_cp_refuses_unknown_names_and_overwrites(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["cp", "no_such_recipe", "x.yaml"]) == 2
    assert "no shipped recipe named 'no_such_recipe'" in capsys.readouterr().err
    (tmp_path / "x.yaml").write_text("mine")
    assert main(["cp", "quickstart", "x.yaml"]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (tmp_path / "x.yaml").read_text() == "mine"
    assert main(["cp", "quickstart", "x.yaml", "--force"]) == 0
    assert "name: quickstart" in (tmp_path / "x.yaml").read_text()


def test_shipped_schema_is_current_and_every_recipe_names_it():
    assert SCHEMA_FILE.read_text() == schema_text(), "regenerate it: prunerl schema --write"
    assert main(["schema", "--check"]) == 0
    for path in SHIPPED.values():
        match = SCHEMA_COMMENT.search(path.read_text())
        assert match and (path.parent / match.group(1)).resolve() == SCHEMA_FILE, path


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_schema_accepts_every_shipped_recipe(validator, name):
    tree = yaml.safe_load(SHIPPED[name].read_text())
    assert [e.message for e in validator.iter_errors(tree)] == []


def _quickstart() -> dict:
    return yaml.safe_load(SHIPPED["quickstart"].read_text())


def _broken(change) -> dict:
    tree = copy.deepcopy(_quickstart())
    change(tree)
    return tree


# Mistakes an editor should flag as they are typed; pydantic rejects each one too.
MISTAKES = {
    "typo in a key": lambda t: t["stages"][0].update(stepz=10),
    "string for an int": lambda t: t["stages"][0].update(steps="many"),
    "out of range": lambda t: t["stages"][0].update(group_size=0),
    "unknown stage kind": lambda t: t["stages"][1].update(kind="prune"),
    "unknown algorithm": lambda t: t["stages"][0].update(algorithm="ppo"),
    "missing model path": lambda t: t["model"].pop("path"),
    "typo in a nested key": lambda t: t["stages"][0]["rollout"].update(max_new_token=64),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_schema_and_pydantic_both_reject_mistakes(validator, tmp_path, mistake):
    tree = _broken(MISTAKES[mistake])
    assert list(validator.iter_errors(tree)), f"the JSON schema accepts: {mistake}"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(RecipeError):
        load_recipe(path)
