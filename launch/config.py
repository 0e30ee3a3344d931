"""Load a recipe: YAML + dotted `key=value` overrides -> a validated `Recipe`, or clear errors."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from launch.schema import (NAME_PATTERN, STAGE_TYPES, AllCompletions, CPPOCompletions, DPPOCompletions,
                           DPPOPrompts, NoPromptPruning, Recipe)


_STAGE_NAME = re.compile(NAME_PATTERN)
# The tags pydantic puts into error locations for tagged unions: stage kinds and selection methods.
_UNION_TAGS = ({cls.model_fields["kind"].default for cls in STAGE_TYPES}
               | {cls.model_fields["method"].default
                  for cls in (AllCompletions, CPPOCompletions, DPPOCompletions, NoPromptPruning, DPPOPrompts)})


class RecipeError(Exception):
    """A recipe that cannot run; `problems` holds one line per problem, each naming a field path."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _list_item(node, key, ".".join(parts[: i + 1]))
        else:
            node = node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            raise RecipeError([f"{dotted}: '{'.'.join(parts[:i + 1])}' is a value, not a section"])
    last = parts[-1]
    if isinstance(node, list):
        idx = node.index(_list_item(node, last, dotted))
        node[idx] = value
    else:
        node[last] = value


def _list_item(items: list, key: str, where: str):
    """Stages are addressed by name (`stages.train.loss.agg`) or by index (`stages.0...`)."""
    if key.isdigit() and int(key) < len(items):
        return items[int(key)]
    for item in items:
        if isinstance(item, dict) and item.get("name") == key:
            return item
    raise RecipeError([f"{where}: no list item named or numbered '{key}'"])


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed, problems = [], []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"{item}: overrides look like key.path=value")
            continue
        try:
            parsed.append((key, yaml.safe_load(raw) if raw else ""))
        except yaml.YAMLError as e:
            problems.append(f"{key}: override value {raw!r} is not valid YAML "
                            f"({getattr(e, 'problem', e)}); quote it to pass a string")
    if problems:
        raise RecipeError(problems)
    return parsed


def _stage_label(stage, index: str) -> str:
    """A stage is named in error paths by its name when it has a usable one, else by its index."""
    name = stage.get("name") if isinstance(stage, dict) else None
    return name if isinstance(name, str) and _STAGE_NAME.fullmatch(name) else index


def _readable_path(parts: list[str], tree) -> list[str]:
    """pydantic's error location as the recipe's own path: stages named rather than numbered, and
    the tags pydantic inserts for tagged unions (a stage's `kind`, a selection `method`) left out."""
    out, node = [], tree
    for i, part in enumerate(parts):
        if part in _UNION_TAGS and not (isinstance(node, dict) and part in node):
            continue  # a union tag, not a key of the recipe
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
            out.append(_stage_label(node, part) if i == 1 and parts[0] == "stages" else part)
            continue
        out.append(part)
        node = node.get(part) if isinstance(node, dict) else None
    return out


def _format_error(err: dict, tree: dict) -> list[str]:
    if err["type"] == "stage_graph":  # already one (path, message) per problem, see launch.schema
        return [f"{path}: {msg}" for path, msg in err["ctx"]["problems"]]
    parts = _readable_path([str(p) for p in err["loc"] if not str(p).startswith("function-after")], tree)
    loc = ".".join(parts)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required field is missing"
    elif err["type"] == "union_tag_invalid":
        tag = err["ctx"]["discriminator"].strip("'")
        loc += "." + tag
        what = "stage kind" if tag == "kind" else tag
        msg = f"unknown {what} {err.get('input', {}).get(tag)!r}; expected one of {err['ctx']['expected_tags']}"
    elif err["type"] == "union_tag_not_found":
        tag = err["ctx"]["discriminator"].strip("'")
        loc += "." + tag
        msg = "each stage needs a `kind`" if tag == "kind" else f"needs a `{tag}`"
    return [f"{loc or '<recipe>'}: {msg}"]


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe. Raises RecipeError with one line per problem."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"{path}: no such recipe file"])
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError([f"{path}: cannot read the recipe: {e}"]) from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise RecipeError([f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}"]) from None
    if not isinstance(tree, dict):
        raise RecipeError([f"{path}: a recipe is a YAML mapping with name, model, data and stages"])
    problems = []
    for key, value in parse_overrides(list(overrides)):
        try:
            _set_dotted(tree, key, value)
        except RecipeError as e:
            problems.extend(e.problems)
    if problems:
        raise RecipeError(problems)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as e:
        raise RecipeError([line for err in e.errors() for line in _format_error(err, tree)]) from None


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
