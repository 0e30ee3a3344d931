"""CPPO: completion pruning by |advantage| (arXiv 2503.22342).

The policy gradient is ≈ Σ_i Â_i ∇logπ(o_i): completions with |Â_i| ≈ 0 contribute almost
nothing, and Â is known before any learner pass, so they are dropped before it. Survivors keep
weight 1 (no rescaling) and the loss is normalised over the kept rows.

    rule "batch" (the authors' code): over the N completions of the step, drop the ⌊P·N⌋ with the
        smallest |Â|. Groups whose rewards are all equal (Â ≡ 0) go first, entirely.
    rule "group" (the paper's text):  per prompt, keep the k = ⌊G·(1−P)⌋ with the largest |Â|.

Ties keep the earlier row. Dynamic completion allocation draws 1/(1−P) times more prompts per step
so that the learner still trains B·G completions (`allocated_prompts`).
"""
from __future__ import annotations

import torch
from torch import Tensor

CPPO_RULES = ("batch", "group")


def cppo_keep(advantages: Tensor, group_size: int, rate: float, rule: str) -> Tensor:
    """Sorted indices of the kept rows of advantages [N] (N / group_size consecutive groups)."""
    if not 0 <= rate < 1:
        raise ValueError(f"pruning rate must be in [0, 1), got {rate}")
    magnitude = advantages.abs()
    if rule == "batch":
        dropped = int(rate * magnitude.numel())
        order = torch.sort(magnitude, stable=True).indices  # ascending |Â|, earlier row first on ties
        return order[dropped:].sort().values
    if rule == "group":
        keep = int(group_size * (1 - rate))
        if keep < 1:
            raise ValueError(f"rule 'group' keeps ⌊G·(1−P)⌋ = ⌊{group_size}·{1 - rate:g}⌋ = 0 completions per prompt")
        order = torch.sort(-magnitude.view(-1, group_size), dim=1, stable=True).indices[:, :keep]
        offsets = torch.arange(0, magnitude.numel(), group_size).unsqueeze(1)
        return (order + offsets).flatten().sort().values
    raise ValueError(f"unknown CPPO rule {rule!r}; expected one of {CPPO_RULES}")


def allocated_prompts(prompts_per_step: int, rate: float) -> int:
    """Prompts drawn per step under dynamic allocation: B / (1 − P), which must be an integer."""
    drawn = prompts_per_step / (1 - rate)
    if abs(drawn - round(drawn)) > 1e-6:
        raise ValueError(f"allocation draws prompts_per_step / (1 − P) = {prompts_per_step} / {1 - rate:g} = "
                         f"{drawn:g} prompts, not an integer")
    return round(drawn)
