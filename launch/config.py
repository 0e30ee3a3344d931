"""Load a recipe: YAML + dotted `key=value` overrides -> a validated `Recipe`, or clear errors."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from launch.schema import (STAGE_TYPES, AllCompletions, CPPOCompletions, DPPOCompletions, DPPOPrompts,
                           NoPromptPruning, Recipe, clip, name_problem)


MAX_DEPTH = 32  # levels of nesting a recipe may have (the schema needs 7)
MAX_PROBLEMS = 20  # lines an error report shows; the rest are counted
MAX_LINE = 500  # characters of one reported line
# The tags pydantic puts into error locations for tagged unions: stage kinds and selection methods.
_UNION_TAGS = ({cls.model_fields["kind"].default for cls in STAGE_TYPES}
               | {cls.model_fields["method"].default
                  for cls in (AllCompletions, CPPOCompletions, DPPOCompletions, NoPromptPruning, DPPOPrompts)})


class RecipeError(Exception):
    """A recipe that cannot run; `problems` holds one line per problem, each naming a field path.

    At most MAX_PROBLEMS lines are kept, then one "... and N more problems" line.
    """

    def __init__(self, problems: list[str]):
        shown = [clip(line, MAX_LINE) for line in problems[:MAX_PROBLEMS]]
        if len(problems) > MAX_PROBLEMS:
            more = len(problems) - MAX_PROBLEMS
            shown.append(f"... and {more} more problem{'s' if more > 1 else ''}")
        super().__init__("\n".join(shown))
        self.problems = shown


class _TooDeep(Exception):
    def __init__(self, mark):
        self.mark = mark


if yaml.__with_libyaml__:  # libyaml's scanner and parser (4x faster), PyYAML's composer and safe constructor
    class _SafeLoader(Composer, yaml.cyaml.CParser, SafeConstructor, Resolver):
        def __init__(self, stream):
            yaml.cyaml.CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
else:
    _SafeLoader = yaml.SafeLoader


class _RecipeLoader(_SafeLoader):
    """A safe loader that stops at MAX_DEPTH levels: PyYAML composes nodes recursively, so a deeply
    nested document would otherwise end in a RecursionError thousands of lines long."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooDeep(self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _load_yaml(text: str) -> Any:
    loader = _RecipeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _depth(tree) -> int | None:
    """Levels of nesting of a loaded recipe (a scalar is one level), or None when a YAML alias makes
    it contain itself. Iterative, and each shared (aliased) node is measured once."""
    depth: dict[int, int] = {}
    open_nodes: set[int] = set()  # nodes whose children are being measured: the current path
    stack = [(tree, False)]
    while stack:
        node, children_done = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        children = node.values() if isinstance(node, dict) else node
        if children_done:
            open_nodes.discard(id(node))
            depth[id(node)] = 1 + max((depth.get(id(c), 1) for c in children), default=0)
        elif id(node) in open_nodes:
            return None
        elif id(node) not in depth:
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children)
    return depth.get(id(tree), 1)


def _echo(value) -> str:
    """A user's value quoted for an error message, cut short."""
    return repr(clip(value)) if isinstance(value, str) else clip(repr(value))


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _list_item(node, key, ".".join(parts[: i + 1]))
        else:
            node = node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            raise RecipeError([f"{clip(dotted)}: {clip('.'.join(parts[:i + 1]))!r} is a value, not a section"])
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
    raise RecipeError([f"{clip(where)}: no list item named or numbered {_echo(key)}"])


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed, problems = [], []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"{clip(item)}: overrides look like key.path=value")
            continue
        try:
            parsed.append((key, _load_yaml(raw) if raw else ""))
        except yaml.YAMLError as e:
            problems.append(f"{clip(key)}: override value {_echo(raw)} is not valid YAML "
                            f"({getattr(e, 'problem', e)}); quote it to pass a string")
        except _TooDeep:
            problems.append(f"{clip(key)}: override value is nested deeper than {MAX_DEPTH} levels")
    if problems:
        raise RecipeError(problems)
    return parsed


def _stage_label(stage, index: str) -> str:
    """A stage is named in error paths by its name when it has a usable one, else by its index."""
    name = stage.get("name") if isinstance(stage, dict) else None
    return name if isinstance(name, str) and name_problem(name, stage=True) is None else index


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
        out.append(clip(part, 40))
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
        msg = f"unknown {what} {_echo(err.get('input', {}).get(tag))}; expected one of {err['ctx']['expected_tags']}"
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
        tree = _load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise RecipeError([f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}"]) from None
    except _TooDeep as e:
        raise RecipeError([f"{path}: nested deeper than {MAX_DEPTH} levels (line {e.mark.line + 1})"]) from None
    except RecursionError:  # not expected with the depth limit above; never print the traceback
        raise RecipeError([f"{path}: nested too deeply to read"]) from None
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
    depth = _depth(tree)
    if depth is None or depth > MAX_DEPTH:
        raise RecipeError([f"{path}: " + ("a YAML alias makes the recipe contain itself" if depth is None else
                                          f"nested {depth} levels deep with its overrides; at most {MAX_DEPTH}")])
    try:
        return Recipe.model_validate(tree)
    except ValidationError as e:
        raise RecipeError([line for err in e.errors() for line in _format_error(err, tree)]) from None


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
