"""DPPO: unbiased dynamic pruning of prompts and completions (Zhu et al., 2026).

Each item (a prompt, or a completion within its group) is kept with probability 1 − p_i and, when
kept, weighted 1 / (1 − p_i). With the loss normalised by the FULL batch's count (what it would
have divided by without pruning), the expected gradient of the unclipped, KL-free surrogate equals
the full-batch gradient: E[Σ_kept x_i / (1 − p_i)] = Σ_all x_i.

Probabilities come from scores (prompts: an EMA of the group's reward std over past visits;
completions: |Â_i|), lower score → higher p, by rank so the scale of the score does not matter:

    u_i = (n − rank_i) / n          rank 0 = lowest score, ties share their average rank
    p_i = min(max_prob, c · u_i)    c chosen so that mean_i p_i = rate (rate ≤ max_prob)

so p_i < 1 always, the expected pruned fraction is exactly `rate`, and every weight is at most
1 / (1 − max_prob). A prompt never seen before has no score and is never pruned (p = 0).
The `deterministic` variant prunes the round(rate·n) lowest-score items exactly and weights the
rest n / kept (same scale, biased selection) — offered for comparison.

Everything here is a pure function of tensors except `PromptHistory`, a small dict of scores
that lives in the checkpoint so that a resumed run draws the same probabilities.
"""
from __future__ import annotations

import torch
from torch import Tensor


def prune_probabilities(scores: Tensor, rate: float, max_prob: float) -> Tensor:
    """p_i for scores [n] (see the module doc)."""
    if not 0 <= rate <= max_prob < 1:
        raise ValueError(f"need 0 <= rate <= max_prob < 1, got rate={rate}, max_prob={max_prob}")
    n = scores.numel()
    if n == 0 or rate == 0:
        return torch.zeros(n, dtype=torch.float64)
    s = scores.double()
    below = (s.unsqueeze(0) < s.unsqueeze(1)).sum(1).double()   # items scoring lower than i
    equal = (s.unsqueeze(0) == s.unsqueeze(1)).sum(1).double()  # including i itself
    u = (n - (below + (equal - 1) / 2)) / n
    # Water-filling: cap the m largest u at max_prob, scale the rest so the mean is `rate`.
    desc = sorted(u.tolist(), reverse=True)
    rest = sum(desc)
    for m in range(n):
        c = (rate * n - m * max_prob) / rest
        if c * desc[m] <= max_prob:
            return torch.clamp(c * u, max=max_prob)
        rest -= desc[m]
    return torch.full((n,), max_prob, dtype=torch.float64)  # rate == max_prob


def sample_kept(probs: Tensor, generator: torch.Generator, deterministic: bool = False) -> tuple[Tensor, Tensor]:
    """(kept mask [n] bool, weights [n]) for prune probabilities [n]; weights are 0 where pruned."""
    n = probs.numel()
    if deterministic:
        pruned = round(probs.mean().item() * n) if n else 0
        # Highest p first = lowest score first; ties by position.
        order = torch.sort(-probs, stable=True).indices
        kept = torch.ones(n, dtype=torch.bool)
        kept[order[:pruned]] = False
        weights = torch.where(kept, torch.full((n,), n / max(1, n - pruned), dtype=torch.float64),
                              torch.zeros(n, dtype=torch.float64))
        return kept, weights
    kept = torch.rand(n, generator=generator, dtype=torch.float64) >= probs
    weights = torch.where(kept, 1.0 / (1.0 - probs), torch.zeros_like(probs))
    return kept, weights


def dppo_keep_completions(advantages: Tensor, group_size: int, rate: float, max_prob: float,
                          generator: torch.Generator, deterministic: bool = False) -> tuple[Tensor, Tensor]:
    """(sorted kept row indices, their weights) for advantages [N], scored by |Â| within each group."""
    groups = advantages.abs().view(-1, group_size)
    probs = torch.stack([prune_probabilities(g, rate, max_prob) for g in groups]).flatten()
    if deterministic:  # the lowest-|Â| fraction of each group, exactly
        per_group = [sample_kept(p, generator, True) for p in probs.view(-1, group_size)]
        kept, weights = torch.cat([k for k, _ in per_group]), torch.cat([w for _, w in per_group])
    else:
        kept, weights = sample_kept(probs, generator)
    idx = kept.nonzero().flatten()
    return idx, weights[idx].float()


class PromptHistory:
    """Per-prompt score: an EMA of the group's reward std over the prompt's past visits."""

    def __init__(self, decay: float):
        self.decay = decay
        self.scores: dict[int, float] = {}

    def probabilities(self, prompt_ids: list[int], rate: float, max_prob: float) -> Tensor:
        """Prune probability of each prompt; 0 for prompts without history."""
        seen = [k for k, i in enumerate(prompt_ids) if i in self.scores]
        probs = torch.zeros(len(prompt_ids), dtype=torch.float64)
        if seen:
            scores = torch.tensor([self.scores[prompt_ids[k]] for k in seen], dtype=torch.float64)
            probs[seen] = prune_probabilities(scores, rate, max_prob)
        return probs

    def update(self, prompt_ids: list[int], rewards: Tensor, group_size: int) -> None:
        """Record each generated prompt's group reward std (rewards [len(prompt_ids) * G])."""
        stds = rewards.double().view(-1, group_size).std(dim=1)
        for i, s in zip(prompt_ids, stds.tolist()):
            old = self.scores.get(i)
            self.scores[i] = s if old is None else self.decay * old + (1 - self.decay) * s

    def state_dict(self) -> dict:
        return {"scores": {str(k): v for k, v in self.scores.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.scores = {int(k): float(v) for k, v in state["scores"].items()}
