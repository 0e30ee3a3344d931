"""Token-budget micro-batches for the learner, and their even split across data-parallel ranks."""
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


def padding_fraction(lengths: list[int], batches: list[list[int]]) -> float:
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
