"""Generate docs/recipe-reference.md from the recipe schema (launch/schema.py).

    python docs/gen_recipe_reference.py           # rewrite docs/recipe-reference.md
    python docs/gen_recipe_reference.py --check   # exit 1 if the committed file is stale

Every section and field of `Recipe` is listed with its dotted path (the one `prunerl validate`
errors and command-line overrides use), type and constraints, default and description. The stage
kinds are read from the schema's discriminated `stages` union, so a new kind appears here by
itself.
"""
from __future__ import annotations

import argparse
import enum
import json
import sys
import types
import typing
from pathlib import Path

import annotated_types
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "recipe-reference.md"
REGENERATE = "python docs/gen_recipe_reference.py"
STAGE_PATH = "stages.<name>"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------- reading the schema

def _strip_annotated(tp):
    """(bare type, extra metadata) of a possibly `Annotated[...]` type."""
    metadata = []
    while typing.get_origin(tp) is typing.Annotated:
        tp, *extra = typing.get_args(tp)
        metadata.extend(extra)
    return tp, metadata


def _union_members(tp) -> tuple:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _is_model(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def stage_kinds(recipe_cls) -> list[tuple[str, type[BaseModel]]]:
    """(kind, config class) of each member of the `stages` union, in declaration order."""
    list_type = recipe_cls.model_fields["stages"].annotation
    (item,) = typing.get_args(list_type)
    union, metadata = _strip_annotated(item)
    discriminator = next(m.discriminator for m in metadata if getattr(m, "discriminator", None))
    kinds = []
    for cls in _union_members(union):
        (kind,) = typing.get_args(cls.model_fields[discriminator].annotation)
        kinds.append((kind, cls))
    return kinds


# ---------------------------------------------------------------- rendering values

def _code(text: str) -> str:
    text = text.replace("|", "\\|").replace("\n", "\\n")
    return f"`{text}`"


def _type_name(tp) -> str:
    tp, _ = _strip_annotated(tp)
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(_code(json.dumps(v)) for v in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        rest = [m for m in members if m is not type(None)]
        name = " or ".join(_type_name(m) for m in rest)
        return f"{name} or null" if len(rest) < len(members) else name
    if origin in (list, typing.List):
        (item,) = typing.get_args(tp)
        return f"list of {_type_name(item)}"
    if origin in (tuple, typing.Tuple):
        return "[" + ", ".join(_type_name(a) for a in typing.get_args(tp)) + "]"
    if origin in (dict, typing.Dict):
        key, value = typing.get_args(tp)
        return f"mapping of {_type_name(key)} to {_type_name(value)}"
    if _is_model(tp):
        return "section"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(_code(json.dumps(m.value)) for m in tp)
    return getattr(tp, "__name__", str(tp))


_BOUNDS = [(annotated_types.Ge, "ge", ">="), (annotated_types.Gt, "gt", ">"),
           (annotated_types.Le, "le", "<="), (annotated_types.Lt, "lt", "<"),
           (annotated_types.MinLen, "min_length", ">="),
           (annotated_types.MaxLen, "max_length", "<=")]


def _constraints(field) -> list[str]:
    out = []
    for m in field.metadata:
        for cls, attr, word in _BOUNDS:
            if isinstance(m, cls):
                value = getattr(m, attr)
                out.append(f"length {word} {value}" if "length" in attr else f"{word} {value}")
        pattern = getattr(m, "pattern", None)
        if pattern is not None:
            out.append(f"matches {_code(pattern)}")
    return out


def _default(field) -> str:
    if field.is_required():
        return "**required**"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section defaults)"
    if isinstance(value, list):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    return _code(json.dumps(value))


def _description(field) -> str:
    return (field.description or "").replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------- sections

def _section_models(tp) -> list[tuple[str, type[BaseModel]]]:
    """Sub-sections reachable from a field type: ("", Model) or ("[]", Model) for list items."""
    tp, _ = _strip_annotated(tp)
    if _is_model(tp):
        return [("", tp)]
    out = []
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(tp):
            out.extend(_section_models(member))
    elif origin in (list, typing.List):
        (item,) = typing.get_args(tp)
        out.extend((f"[]{suffix}", m) for suffix, m in _section_models(item))
    return out


def _anchor(path: str) -> str:
    keep = "".join(c for c in path.lower() if c.isalnum() or c in " -_")
    return keep.replace(" ", "-")


def _kind_anchor(kind: str, cls: type[BaseModel]) -> str:
    return _anchor(f"kind {kind} {cls.__name__}")


def _table(path: str, cls: type[BaseModel], kinds=()) -> tuple[list[str], list[tuple[str, type[BaseModel]]]]:
    """The field table of one section, and the sub-sections its fields open."""
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    children = []
    for name, field in cls.model_fields.items():
        dotted = f"{path}.{field.alias or name}" if path else (field.alias or name)
        if kinds and dotted == "stages":  # the discriminated union: one section per kind, below
            kind = "list of stages, by `kind`: " + ", ".join(
                f"[`{k}`](#{_kind_anchor(k, c)})" for k, c in kinds)
        else:
            kind = _type_name(field.annotation)
            subs = [(f"{dotted}{suffix}", sub) for suffix, sub in _section_models(field.annotation)]
            if subs:
                kind += " (" + ", ".join(f"[{sub.__name__}](#{_anchor(f'{p} {sub.__name__}')})"
                                         for p, sub in subs) + ")"
            children.extend(subs)
        constraints = _constraints(field)
        if constraints:
            kind += "; " + ", ".join(constraints)
        rows.append(f"| `{dotted}` | {kind} | {_default(field)} | {_description(field)} |")
    return rows, children


def _render_section(path: str, cls: type[BaseModel], out: list[str], seen: set,
                    heading: str | None = None) -> None:
    """A section's heading and table, then its sub-sections; a section shared by several stage
    kinds (same path, same class) is written once and linked from each."""
    if heading is None:
        if (path, cls) in seen:
            return
        seen.add((path, cls))
    out.extend([heading or f"### `{path}` ({cls.__name__})", ""])
    doc = cls.__dict__.get("__doc__")
    if doc:
        out.extend([" ".join(doc.split()), ""])
    rows, children = _table(path, cls)
    out.extend([*rows, ""])
    for child_path, child in children:
        _render_section(child_path, child, out, seen)


def render() -> str:
    import launch.schema as schema

    recipe = schema.Recipe
    kinds = stage_kinds(recipe)
    out = [
        "# Recipe reference",
        "",
        f"<!-- Generated from launch/schema.py by `{REGENERATE}`; do not edit by hand. -->",
        "",
        " ".join((schema.__doc__ or "").split()),
        "",
        "Every path below is what `prunerl validate` names in its errors and what a command-line "
        "override sets, e.g. `prunerl validate RECIPE stages.train.loss.kl_coef=0.04`. A stage is "
        f"addressed by its name or its index: `{STAGE_PATH}` stands for either. Unknown keys are "
        "errors.",
        "",
        "## Top level",
        "",
    ]
    seen: set = set()
    rows, children = _table("", recipe, kinds)
    out.extend([*rows, "", "## Sections", ""])
    for path, cls in children:
        _render_section(path, cls, out, seen)
    out.extend([
        "## Stages",
        "",
        "`stages` is a list; the `kind` of each item picks its fields. Stage kinds: "
        + ", ".join(f"[`{kind}`](#{_kind_anchor(kind, cls)})" for kind, cls in kinds)
        + ".",
        "",
    ])
    for kind, cls in kinds:
        _render_section(STAGE_PATH, cls, out, seen, heading=f"### kind `{kind}` ({cls.__name__})")
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file on disk is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.is_file() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(ROOT)} is stale; run: {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
