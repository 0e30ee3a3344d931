"""Seeded generator of synthetic GSM8K-format word problems.

Each row is ``{"question": str, "answer": str}`` where the answer is a short worked
solution followed by GSM8K's final line ``#### <int>``. Problems use small numbers and
the operations +, - and a small *, in one or two steps, so that a tiny model can learn
them partially.

    python recipes/assets/synth_gsm8k.py --out DIR --train 2000 --eval 200 --seed 0

writes ``DIR/train.jsonl`` and ``DIR/eval.jsonl`` with disjoint questions.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Callable, Iterator

PEOPLE = [
    ("Tom", "he", "him"), ("Anna", "she", "her"), ("Ben", "he", "him"), ("Mia", "she", "her"),
    ("Sam", "he", "him"), ("Lily", "she", "her"), ("Max", "he", "him"), ("Emma", "she", "her"),
    ("Leo", "he", "him"), ("Zoe", "she", "her"), ("Jack", "he", "him"), ("Nina", "she", "her"),
    ("Omar", "he", "him"), ("Ella", "she", "her"), ("Ravi", "he", "him"), ("Sara", "she", "her"),
]
OBJECTS = [
    "apples", "marbles", "stickers", "cookies", "pencils", "books",
    "cards", "balloons", "shells", "coins", "candies", "toys",
]
# (plural container, singular container)
CONTAINERS = [("boxes", "box"), ("bags", "bag"), ("packs", "pack"), ("baskets", "basket"), ("jars", "jar")]
# (singular item, plural item)
ITEMS = [("pen", "pens"), ("ball", "balls"), ("cake", "cakes"), ("kite", "kites"), ("notebook", "notebooks")]

Problem = tuple[str, str, int]  # question, worked solution (without the #### line), result


def _two_people(rng: random.Random):
    a, b = rng.sample(PEOPLE, 2)
    return a, b


def _buy(rng: random.Random) -> Problem:
    (n, p, _), obj = rng.choice(PEOPLE), rng.choice(OBJECTS)
    a, b = rng.randint(2, 30), rng.randint(2, 20)
    q = f"{n} has {a} {obj}. {p.capitalize()} buys {b} more {obj}. How many {obj} does {n} have now?"
    return q, f"{n} has {a} + {b} = {a + b} {obj} now.", a + b


def _receive(rng: random.Random) -> Problem:
    (n, _, pron), (m, _, _) = _two_people(rng)
    obj = rng.choice(OBJECTS)
    a, b = rng.randint(2, 30), rng.randint(2, 20)
    q = f"{n} has {a} {obj}. {m} gives {pron} {b} more. How many {obj} does {n} have now?"
    return q, f"{n} has {a} + {b} = {a + b} {obj} now.", a + b


def _lose(rng: random.Random) -> Problem:
    (n, p, _), obj = rng.choice(PEOPLE), rng.choice(OBJECTS)
    b = rng.randint(2, 20)
    a = rng.randint(b + 1, 40)
    q = f"{n} has {a} {obj}. {p.capitalize()} loses {b} of them. How many {obj} does {n} have left?"
    return q, f"{n} has {a} - {b} = {a - b} {obj} left.", a - b


def _give(rng: random.Random) -> Problem:
    (n, p, _), (m, _, _) = _two_people(rng)
    obj = rng.choice(OBJECTS)
    b = rng.randint(2, 20)
    a = rng.randint(b + 1, 40)
    q = f"{n} has {a} {obj}. {p.capitalize()} gives {b} {obj} to {m}. How many {obj} does {n} have left?"
    return q, f"{n} has {a} - {b} = {a - b} {obj} left.", a - b


def _together(rng: random.Random) -> Problem:
    (n, _, _), (m, _, _) = _two_people(rng)
    obj = rng.choice(OBJECTS)
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    q = f"{n} has {a} {obj} and {m} has {b} {obj}. How many {obj} do they have together?"
    return q, f"They have {a} + {b} = {a + b} {obj} together.", a + b


def _more_than(rng: random.Random) -> Problem:
    (n, _, _), (m, _, _) = _two_people(rng)
    obj = rng.choice(OBJECTS)
    a, b = rng.randint(2, 30), rng.randint(2, 20)
    q = f"{n} has {a} {obj}. {m} has {b} more {obj} than {n}. How many {obj} does {m} have?"
    return q, f"{m} has {a} + {b} = {a + b} {obj}.", a + b


def _fewer_than(rng: random.Random) -> Problem:
    (n, _, _), (m, _, _) = _two_people(rng)
    obj = rng.choice(OBJECTS)
    b = rng.randint(2, 20)
    a = rng.randint(b + 1, 40)
    q = f"{n} has {a} {obj}. {m} has {b} fewer {obj} than {n}. How many {obj} does {m} have?"
    return q, f"{m} has {a} - {b} = {a - b} {obj}.", a - b


def _groups(rng: random.Random) -> Problem:
    (n, _, _), obj = rng.choice(PEOPLE), rng.choice(OBJECTS)
    cont, cont_s = rng.choice(CONTAINERS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    q = f"{n} has {a} {cont} of {obj}. Each {cont_s} has {b} {obj}. How many {obj} does {n} have?"
    return q, f"{n} has {a} * {b} = {a * b} {obj}.", a * b


def _price(rng: random.Random) -> Problem:
    (n, _, _), (item, items) = rng.choice(PEOPLE), rng.choice(ITEMS)
    price, count = rng.randint(2, 9), rng.randint(2, 9)
    q = f"One {item} costs {price} dollars. {n} buys {count} {items}. How many dollars does {n} spend?"
    return q, f"{n} spends {count} * {price} = {count * price} dollars.", count * price


def _buy_then_give(rng: random.Random) -> Problem:
    (n, p, _), (m, _, _) = _two_people(rng)
    obj = rng.choice(OBJECTS)
    a, b = rng.randint(2, 20), rng.randint(2, 15)
    s = a + b
    d = rng.randint(1, s - 1)
    q = (f"{n} has {a} {obj}. {p.capitalize()} buys {b} more and then gives {d} to {m}. "
         f"How many {obj} does {n} have now?")
    sol = f"{n} has {a} + {b} = {s} {obj}. After giving {d} away, {n} has {s} - {d} = {s - d} {obj}."
    return q, sol, s - d


def _groups_then_add(rng: random.Random) -> Problem:
    (n, _, _), obj = rng.choice(PEOPLE), rng.choice(OBJECTS)
    cont, _ = rng.choice(CONTAINERS)
    a, b, c = rng.randint(2, 6), rng.randint(2, 6), rng.randint(2, 15)
    q = (f"There are {a} {cont} with {b} {obj} in each. {n} adds {c} more {obj}. "
         f"How many {obj} are there now?")
    sol = f"There are {a} * {b} = {a * b} {obj}. Then there are {a * b} + {c} = {a * b + c} {obj}."
    return q, sol, a * b + c


TEMPLATES: list[Callable[[random.Random], Problem]] = [
    _buy, _receive, _lose, _give, _together, _more_than, _fewer_than,
    _groups, _price, _buy_then_give, _groups_then_add,
]


def make_row(rng: random.Random) -> dict:
    question, solution, result = rng.choice(TEMPLATES)(rng)
    return {"question": question, "answer": f"{solution}\n#### {result}"}


def iter_unique(seed: int, exclude: set[str] | None = None) -> Iterator[dict]:
    """Endless stream of rows with distinct questions, none of them in ``exclude``."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    while True:
        row = make_row(rng)
        if row["question"] not in seen:
            seen.add(row["question"])
            yield row


def generate(n: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
    stream = iter_unique(seed, exclude)
    return [next(stream) for _ in range(n)]


def generate_split(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and eval rows from one seeded stream, so no question appears in both."""
    rows = generate(n_train + n_eval, seed)
    return rows[n_eval:], rows[:n_eval]


def extract_answer(text: str) -> int | None:
    """The integer after the last ``#### `` in ``text``, or None."""
    if "####" not in text:
        return None
    tail = text.rsplit("####", 1)[1].strip().split()
    if not tail:
        return None
    try:
        return int(tail[0].replace(",", ""))
    except ValueError:
        return None


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory")
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
