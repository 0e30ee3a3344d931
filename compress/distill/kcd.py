"""KCD, knowledge condensation: distil on the prompts the student has not learned yet.

A knowledge point is a train prompt. Its value is a running mean (an EMA) of how uncertain the
student still is on it, measured on the sequences trained from it:

    entropy      mean over the completion tokens of H(q_S) = −Σ_v q_v log q_v
    divergence   mean over the completion tokens of the distillation loss itself

Every `interval` steps one condensation round keeps the highest-valued prompts of those kept so
far: after round r, max(min_fraction, 1 − r·shrink) of the full set (rounded). Prompts never seen
yet count as highest (nothing says they are learned). Prompts are drawn by `PromptSampler`'s
shuffled passes over the kept set, re-seeded when the set changes. With min_fraction = 1 the
set never changes, and the draws are exactly those of plain KD's `PromptSampler(N, seed)`.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from rl.data import PromptSampler

VALUE_MEASURES = ("entropy", "divergence")


def sequence_values(student_logits: Tensor, per_token_divergence: Tensor, mask: Tensor, measure: str,
                    temperature: float = 1.0) -> Tensor:
    """Each sequence's value [n] from its [n, W] completion positions (student logits [n, W, V])."""
    if measure == "entropy":
        logq = torch.log_softmax(student_logits.float() / temperature, dim=-1)
        per_token = -(logq.exp() * logq).sum(-1)
    elif measure == "divergence":
        per_token = per_token_divergence
    else:
        raise ValueError(f"unknown KCD value {measure!r}; one of {', '.join(VALUE_MEASURES)}")
    return (per_token.detach() * mask).sum(-1) / mask.sum(-1).clamp_min(1)


class KnowledgeCondenser:
    """Draws train prompts and condenses the set it draws from (see the module docstring).
    `cfg` is a `compress.distill.config.KCDConfig`."""

    def __init__(self, num_points: int, cfg, seed: int):
        self.cfg, self.seed, self.num_points = cfg, seed, num_points
        self.values = np.full(num_points, np.nan)  # NaN: not seen yet
        self.kept = np.arange(num_points)
        self.rounds = 0
        self._sampler = PromptSampler(num_points, seed)

    def next(self, count: int) -> list[int]:
        """`count` prompt indices (into the full set), from the kept set."""
        return [int(self.kept[i]) for i in self._sampler.next(count)]

    def observe(self, values: list[tuple[int, float]]) -> None:
        """Fold in (prompt index, value) pairs measured on this step's sequences."""
        decay = self.cfg.ema
        for point, value in values:
            old = self.values[point]
            self.values[point] = value if np.isnan(old) else decay * old + (1 - decay) * value

    def end_step(self, step: int) -> None:
        """Called after optimizer step `step` (1-based): a condensation round every `interval` steps."""
        if step % self.cfg.interval == 0:
            self.condense()

    def condense(self) -> None:
        self.rounds += 1
        fraction = max(self.cfg.min_fraction, 1.0 - self.rounds * self.cfg.shrink)
        size = max(1, round(fraction * self.num_points))
        if size >= len(self.kept):
            return
        ranking = np.where(np.isnan(self.values[self.kept]), np.inf, self.values[self.kept])
        top = np.argsort(-ranking, kind="stable")[:size]
        self.kept = np.sort(self.kept[top])
        sampler_seed = int(np.random.SeedSequence([self.seed, self.rounds]).generate_state(1)[0] >> 1)
        self._sampler = PromptSampler(size, sampler_seed)
