"""The comparison table: one row per artifact, as markdown (`table.md`) and as a W&B table; and
for W&B, a sample of each artifact's completions beside the same prompts' references."""
from __future__ import annotations

from operator import itemgetter
from pathlib import Path

import wandb

from rl.tracking import open_wandb_run

# (header, its value in a results row, format); None prints as n/a.
COLUMNS = (("accuracy", itemgetter("accuracy"), "{:.3f}"),
           ("perplexity", itemgetter("perplexity"), "{:.3f}"),
           ("size MB", lambda row: row["size_bytes"] / 1e6, "{:.2f}"),
           ("bits/weight", itemgetter("bits_per_weight"), "{:.2f}"),
           ("sparsity", itemgetter("sparsity"), "{:.3f}"),
           ("tokens/s", itemgetter("tokens_per_s"), "{:.1f}"),
           ("engine", itemgetter("engine"), "{}"))
# The W&B completions table holds the first COMPLETION_SAMPLES eval problems of every artifact
# (all of them stay in `completions-<artifact>.jsonl`).
COMPLETION_SAMPLES = 16
COMPLETION_COLUMNS = ["artifact", "prompt", "completion", "reference", "correct", "tokens"]
# Keys in the eval stage's own W&B run (its name and job type say which stage it is).
TABLE_KEY, COMPLETIONS_KEY = "eval/table", "eval/completions"


def table_rows(results: dict[str, dict]) -> tuple[list[str], list[list]]:
    """Headers, and per artifact (in `results` order) its name and values."""
    return (["artifact", *(header for header, _, _ in COLUMNS)],
            [[name, *(value(row) for _, value, _ in COLUMNS)] for name, row in results.items()])


def formatted_cells(row: dict) -> list[str]:
    """A results row's COLUMNS as text: n/a for None, or for a column the row predates (a results.json
    written by an older version, read by `prunerl report`)."""
    cells = []
    for _, value, fmt in COLUMNS:
        try:
            v = value(row)
        except (KeyError, TypeError):
            v = None
        cells.append("n/a" if v is None else fmt.format(v))
    return cells


def markdown_table(results: dict[str, dict]) -> str:
    headers = ["artifact", *(header for header, _, _ in COLUMNS)]
    cells = [[name, *formatted_cells(row)] for name, row in results.items()]
    align = [":---", *(":---" if fmt == "{}" else "---:" for _, _, fmt in COLUMNS)]
    return "".join("| " + " | ".join(line) + " |\n" for line in [headers, align, *cells])


def wandb_table(results: dict[str, dict]) -> wandb.Table:
    headers, rows = table_rows(results)
    return wandb.Table(columns=headers, data=rows)


def completion_rows(artifact: str, prompts: list[str], texts: list[str], references: list[str],
                    correct: list[bool], lengths: list[int]) -> list[list]:
    """Rows of COMPLETION_COLUMNS for the first COMPLETION_SAMPLES problems (`prompts` may hold
    only those)."""
    return [[artifact, *row] for row in zip(prompts, texts, references, correct, lengths)][:COMPLETION_SAMPLES]


def log_wandb_table(recipe, run_dir: Path, stage_name: str, results: dict[str, dict],
                    completions: list[list] = ()) -> None:
    """The comparison table and the sampled completions (rows of COMPLETION_COLUMNS) in the stage's
    own W&B run (rl/tracking.py); nothing when W&B is disabled."""
    run = open_wandb_run(recipe, run_dir, stage_name)
    if run is None:
        return
    try:
        run.log({TABLE_KEY: wandb_table(results),
                 COMPLETIONS_KEY: wandb.Table(columns=COMPLETION_COLUMNS, data=list(completions))})
    finally:
        run.finish()
