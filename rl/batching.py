"""Token-budget micro-batches for the learner, and their even split across data-parallel ranks.

Two ways to fill a micro-batch of `max_tokens`:

| function                    | micro-batch cost              | layout it is for                         |
|-----------------------------|-------------------------------|------------------------------------------|
| `token_budget_microbatches` | rows x longest (padded)       | right-padded rows with an attention mask |
| `dense_microbatches`        | sum of lengths (padding-free) | sequences packed into one row            |
"""
from __future__ import annotations


def token_budget_microbatches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Group row indices into padded micro-batches whose padded size (rows x longest) fits the budget.

    Rows are taken longest first so each micro-batch pads little. A row longer than the budget
    gets a micro-batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * longest > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def dense_microbatches(lengths: list[int], max_tokens: int, window: int) -> list[list[int]]:
    """Dense Prompt Packing: window-based greedy fill of padding-free micro-batches.

    A micro-batch costs the sum of its lengths (sequences are packed end to end, no padding).
    Items are scanned in their given order (a caller that wants a prompt's group together orders
    them so); the window is the next `window` items not yet placed:

        while items remain:
            among the window, take the largest item that fits the budget left (ties: the earliest)
            and add it to the current micro-batch;
            if none fits, emit the current micro-batch and start an empty one

    `window=1` is next-fit in the given order (a micro-batch closes as soon as the next item does
    not fit); a wider window lets a smaller later item fill the gap first. An item longer than
    `max_tokens` can fit no micro-batch: it takes no window slot and gets a micro-batch of its own,
    emitted ahead of the packed ones.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    batches = [[i] for i, n in enumerate(lengths) if n > max_tokens]
    pending = [i for i, n in enumerate(lengths) if n <= max_tokens]
    current: list[int] = []
    left = max_tokens
    while pending:
        best = None  # position in `pending`
        for k, i in enumerate(pending[:window]):
            if lengths[i] <= left and (best is None or lengths[i] > lengths[pending[best]]):
                best = k
        if best is None:  # nothing in the window fits; `current` is not empty, as every item fits alone
            batches.append(current)
            current, left = [], max_tokens
            continue
        i = pending.pop(best)
        current.append(i)
        left -= lengths[i]
    if current:
        batches.append(current)
    return batches


def padding_fraction(lengths: list[int], batches: list[list[int]], packed: bool = False) -> float:
    """Share of the tokens the learner processes that are padding (`pack/padding_frac`).

    Padded micro-batches process rows x longest tokens; packed ones exactly the sum of lengths (0).
    """
    if packed:
        return 0.0
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1.0 - real / padded if padded else 0.0


def split_across_ranks(batches: list[list[int]], lengths: list[int], ranks: int) -> list[list[list[int]]]:
    """Assign micro-batches to ranks, heaviest first to the lightest rank.

    Every rank must run the same number of forward/backward passes (ZeRO's collectives run per
    pass), so a rank with fewer micro-batches is topped up with empty ones (`[]`), which the learner
    runs with zero loss weight.
    """
    cost = [sum(lengths[i] for i in b) for b in batches]
    per_rank: list[list[list[int]]] = [[] for _ in range(ranks)]
    load = [0] * ranks
    for j in sorted(range(len(batches)), key=lambda j: -cost[j]):
        r = min(range(ranks), key=lambda r: (load[r], len(per_rank[r])))
        per_rank[r].append(batches[j])
        load[r] += cost[j]
    most = max(len(p) for p in per_rank)
    for p in per_rank:
        p.extend([] for _ in range(most - len(p)))
    return per_rank
