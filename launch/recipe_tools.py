"""`prunerl ls | cp | schema` — the shipped recipes, and the recipe JSON schema for editors.

Shipped recipes live in the `recipes` package; their relative paths (`recipes/assets/...`) are read
from the working directory, as every recipe path is. `prunerl cp` therefore writes paths that would
not resolve from where the copy is run as absolute paths into the shipped assets.

The JSON schema is generated from the pydantic schema (`launch/schema.py`) and shipped beside the
recipes as `recipe.schema.json`; each shipped recipe names it on its first lines with a
`# yaml-language-server: $schema=...` comment, which the YAML language server (VS Code's YAML
extension, Neovim, JetBrains) reads to check a recipe as it is typed.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import recipes

RECIPES_DIR = Path(recipes.__file__).resolve().parent
PACKAGE_ROOT = RECIPES_DIR.parent  # shipped recipes' relative paths start here (`recipes/assets/...`)
SCHEMA_FILE = RECIPES_DIR / "recipe.schema.json"
SCHEMA_COMMENT = re.compile(r"^# yaml-language-server: \$schema=(\S+)\s*$", re.MULTILINE)
EXIT_USAGE = 2


def shipped_recipes() -> dict[str, Path]:
    """Recipe name (file stem) -> file, sorted by name."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def summary_line(path: Path, limit: int = 80) -> str:
    """A recipe's header comment (after the shebang and the schema line) up to its first sentence's
    end, at most `limit` characters."""
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("#!") or SCHEMA_COMMENT.match(line):
            continue
        if not line.startswith("#") or line.lstrip("# ").startswith(("prunerl ", "ray job")):
            break
        lines.append(line.lstrip("#").strip())
    text = re.split(r"(?<=\.)\s", " ".join(lines), maxsplit=1)[0].rstrip(".:;")
    return text if len(text) <= limit else text[:limit - 3].rstrip(" ,;") + "..."


def recipe_schema() -> dict:
    """The JSON schema of a recipe file (draft 2020-12), as pydantic validates it."""
    from launch.schema import Recipe

    schema = Recipe.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "prunerl recipe", **schema}


def schema_text() -> str:
    return json.dumps(recipe_schema(), indent=1, sort_keys=True) + "\n"


def _unresolved_paths(tree, cwd: Path) -> set[str]:
    """String values of a recipe tree that name a shipped file or folder (`recipes/...`) which does
    not exist relative to `cwd`."""
    if isinstance(tree, dict):
        return set().union(*(_unresolved_paths(v, cwd) for v in tree.values()))
    if isinstance(tree, list):
        return set().union(*(_unresolved_paths(v, cwd) for v in tree))
    if isinstance(tree, str) and tree.startswith("recipes/") and (PACKAGE_ROOT / tree).exists() \
            and not (cwd / tree).exists():
        return {tree}
    return set()


def copy_recipe(name: str, dest: Path, cwd: Path, force: bool = False) -> tuple[Path, list[str]]:
    """Copy shipped recipe `name` to `dest` (a file, or a folder to put `<name>.yaml` in). Paths that
    would not resolve from `cwd` become absolute; the schema comment points at the shipped schema.
    Returns the file written and the paths rewritten."""
    import yaml

    source = shipped_recipes().get(name.removesuffix(".yaml"))
    if source is None:
        raise ValueError(f"no shipped recipe named {name!r}; `prunerl ls` lists them")
    target = dest / source.name if dest.is_dir() else dest
    if target.exists() and not force:
        raise ValueError(f"{target} exists; pass --force to overwrite it")
    text = source.read_text()
    rewritten = sorted(_unresolved_paths(yaml.safe_load(text), cwd))
    for path in rewritten:
        text = re.sub(rf"(?<![\w/.-]){re.escape(path)}(?![\w/.-])", str(PACKAGE_ROOT / path), text)
    text = SCHEMA_COMMENT.sub(lambda m: f"# yaml-language-server: $schema={SCHEMA_FILE}", text, count=1)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return target, rewritten


def _method(stage) -> str:
    """What a stage does, in a word: the RL algorithm (`step_grpo` when rollouts are truncated), else its kind."""
    if stage.kind != "rl":
        return stage.kind
    return "step_grpo" if stage.rollout.truncation.enabled else stage.algorithm


def cmd_ls(args) -> int:
    from launch.config import RecipeError, load_recipe

    rows = [("NAME", "NEEDS", "STAGES", "ABOUT")]
    for name, path in shipped_recipes().items():
        try:
            recipe = load_recipe(path)
            stages = ",".join(dict.fromkeys(_method(s) for s in recipe.stages))
            gpus = max(sum(w.count * w.gpus for w in s.workers()) for s in recipe.stages)
            needs = f"{gpus:g} GPU" if gpus else "CPU"
        except RecipeError as e:  # a shipped recipe always validates (tests/test_recipe_tools.py)
            stages, needs = f"invalid: {e.problems[0]}", "?"
        rows.append((name, needs, stages, summary_line(path)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    print(f"\n{len(rows) - 1} recipes in {RECIPES_DIR} (NEEDS: the most GPUs one stage reserves; "
          f"`prunerl plan RECIPE` tells more). `prunerl cp NAME DEST` copies one to edit.")
    return 0


def cmd_cp(args) -> int:
    try:
        target, rewritten = copy_recipe(args.name, Path(args.dest), Path.cwd(), args.force)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"[prunerl] wrote {target}")
    for path in rewritten:
        print(f"[prunerl]   {path} -> {PACKAGE_ROOT / path} (the shipped copy; paths are read from the working dir)")
    print(f"[prunerl] check it with `prunerl validate {target}`, run it with `prunerl run {target}`")
    return 0


def cmd_schema(args) -> int:
    text = schema_text()
    if args.check:
        current = SCHEMA_FILE.read_text() if SCHEMA_FILE.exists() else ""
        if current != text:
            print(f"{SCHEMA_FILE} is stale: regenerate it with `prunerl schema --write`", file=sys.stderr)
            return 1
        return 0
    if args.write:
        SCHEMA_FILE.write_text(text)
        print(f"[prunerl] wrote {SCHEMA_FILE}")
        return 0
    print(text, end="")
    return 0


def register(sub) -> None:
    ls = sub.add_parser("ls", help="list the shipped recipes, one line each")
    ls.set_defaults(fn=cmd_ls)

    cp = sub.add_parser("cp", help="copy a shipped recipe to edit (paths made to resolve from here)")
    cp.add_argument("name", help="a name from `prunerl ls`")
    cp.add_argument("dest", help="file to write, or a folder to put <name>.yaml in")
    cp.add_argument("--force", action="store_true", help="overwrite an existing file")
    cp.set_defaults(fn=cmd_cp)

    schema = sub.add_parser("schema", help="print the recipe JSON schema (for editors' YAML validation)")
    mode = schema.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"rewrite the shipped {SCHEMA_FILE.name}")
    mode.add_argument("--check", action="store_true", help=f"exit 1 if the shipped {SCHEMA_FILE.name} is stale")
    schema.set_defaults(fn=cmd_schema)
