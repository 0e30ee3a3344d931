"""Seeded generator of synthetic word problems with ``<think>`` traces that contain redundant
"Wait" steps: the data of the Step-GRPO testbed (spec: ../shared/specs/ALGORITHMS.md §4;
docs/architecture.md, Step-GRPO).

The problems are synth_gsm8k's (same templates, same seeded stream of distinct questions: with
the same seed and sizes, the same problems as synth_gsm8k's train/eval files, in order). Each
worked solution becomes a thinking trace: its step(s), one per line, then 0-4 redundant checks
of the last step, each a line starting with the trigger word ``Wait``; Step-GRPO's step reward
should learn to drop them. With probability ``CORRECTION_RATE`` the first attempt's last result
is off by 1-3 and a ``Wait`` line corrects it (then 0-3 redundant checks follow), so that not
every trigger is useless. Every trace ends with the answer block that Step-GRPO's probe
(``\\n**Final Answer**\\n\\boxed``, appended after a line's ``\\n``) imitates, then the answer::

    <think>
    Tom has 12 + 7 = 19 apples now.
    Wait, let me check: 12 + 7 = 19.

    **Final Answer**
    \\boxed{19}
    </think>

    The answer is \\boxed{19}.

Each row is ``{"problem": str, "solution": <trace>, "reward_model": {"ground_truth": "<int>"}}``
(a MATH/DAPO-like layout with a nested reference).

    python recipes/assets/synth_think.py [--out recipes/assets/synth_think] [--train 2000] [--eval 200] [--seed 0]

writes ``OUT/train.jsonl`` and ``OUT/eval.jsonl`` with disjoint questions.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path
from typing import Iterator

if __package__ in (None, ""):  # run as a script: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.assets import synth_gsm8k  # noqa: E402
from recipes.assets.synth_gsm8k import write_jsonl  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "synth_think"

MAX_CHECKS = 4  # redundant checks after a right first attempt: uniform in 0..MAX_CHECKS
CORRECTION_RATE = 0.15  # share of traces whose first attempt ends on a wrong result
TRIGGER = re.compile(r"(?<![A-Za-z])Wait(?![A-Za-z])")  # the spec's standalone trigger word
PROBE = "\n**Final Answer**\n\\boxed"  # what Step-GRPO appends after a line to ask for the answer

_STEP = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")
_INVERSE = {"+": "-", "-": "+", "*": "/"}


def _checks(a: str, op: str, b: str, c: int) -> list[str]:
    """Ways of restating ``a op b = c`` (all correct) as a redundant verification step."""
    return [
        f"Wait, let me check: {a} {op} {b} = {c}.",
        f"Wait, let me verify: {c} {_INVERSE[op]} {b} = {a}.",
        f"Wait, is {a} {op} {b} really {c}? Yes.",
        f"Wait, let me recompute: {a} {op} {b} = {c}.",
    ]


def _corrections(a: str, op: str, b: str, c: int, wrong: int) -> list[str]:
    """Ways of catching the wrong result ``a op b = wrong``."""
    return [
        f"Wait, let me check: {a} {op} {b} = {c}. So the answer is {c}, not {wrong}.",
        f"Wait, {a} {op} {b} is {c}, not {wrong}. So the answer is {c}.",
    ]


def make_trace(solution: str, result: int, rng: random.Random) -> str:
    """The thinking trace and answer for one worked solution (sentences become lines)."""
    lines = solution.split(". ")
    lines = [line if line.endswith(".") else line + "." for line in lines]
    a, op, b, c = _STEP.findall(lines[-1])[-1]
    assert int(c) == result, solution
    if rng.random() < CORRECTION_RATE:
        wrong = rng.choice([w for w in range(result - 3, result + 4) if w >= 0 and w != result])
        lines[-1] = lines[-1].replace(f"{a} {op} {b} = {c}", f"{a} {op} {b} = {wrong}")
        lines.append(rng.choice(_corrections(a, op, b, result, wrong)))
        n_checks = rng.randint(0, MAX_CHECKS - 1)
    else:
        n_checks = rng.randint(0, MAX_CHECKS)
    lines += [rng.choice(_checks(a, op, b, result)) for _ in range(n_checks)]
    return "\n".join(["<think>", *lines, "", "**Final Answer**", f"\\boxed{{{result}}}", "</think>", "",
                      f"The answer is \\boxed{{{result}}}."])


def iter_unique(seed: int, exclude: set[str] | None = None) -> Iterator[dict]:
    """Endless stream of rows with distinct problems, none of them in ``exclude``."""
    trace_rng = random.Random(f"synth_think:{seed}")
    for row in synth_gsm8k.iter_unique(seed, exclude):
        solution, result = row["answer"].split("\n#### ")
        yield {"problem": row["question"], "solution": make_trace(solution, int(result), trace_rng),
               "reward_model": {"ground_truth": result}}


def generate(n: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
    stream = iter_unique(seed, exclude)
    return [next(stream) for _ in range(n)]


def generate_split(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and eval rows from one seeded stream, so no problem appears in both."""
    rows = generate(n_train + n_eval, seed)
    return rows[n_eval:], rows[:n_eval]


def solution_lines(row: dict) -> list[str]:
    """The worked solution's lines of a row's trace: those before its first check and its answer block."""
    lines = row["solution"].split("\n")[1:]
    return lines[: next(i for i, line in enumerate(lines) if not line or line.startswith("Wait"))]


def count_triggers(text: str) -> int:
    """Number of standalone "Wait" in ``text`` (Step-GRPO's k_i is this plus one)."""
    return len(TRIGGER.findall(text))


def boxed_answer(text: str) -> int | None:
    """The integer in the last ``\\boxed{...}`` of ``text``, or None if there is none."""
    found = re.findall(r"\\boxed\{(-?\d+)\}", text)
    return int(found[-1]) if found else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(OUT_DIR), help="output directory")
    ap.add_argument("--train", type=int, default=2000, help="number of train rows")
    ap.add_argument("--eval", type=int, default=200, help="number of eval rows")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    train, evals = generate_split(args.train, args.eval, args.seed)
    out = Path(args.out)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", evals)
    print(f"wrote {len(train)} train and {len(evals)} eval rows to {out}")


if __name__ == "__main__":
    main()
