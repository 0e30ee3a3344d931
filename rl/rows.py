"""What the controller hands the learner: one typed row per trained completion."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainingRow:
    prompt_ids: list[int]
    completion_ids: list[int]
    # The engine's per-token log-probs; None (the whole row or one token): unknown, mismatch ratio 1.
    rollout_logprobs: list[float | None] | None
    advantage: float
    weight: float = 1.0    # selection's reweighting (DPPO: 1/(1-p)); multiplies the whole token loss
    masked: bool = False   # in no loss term (a truncated completion under `mask_truncated`)
    # Per completion token: inserted by a truncated rollout, not sampled (rollout/truncation.py).
    inserted: list[bool] | None = None
    train_inserted: bool = True  # inserted tokens are in the loss (`loss.train_inserted`)

    @property
    def length(self) -> int:
        """Tokens the learner's forward pass reads."""
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def loss_tokens(self) -> int:
        """Tokens that enter the loss."""
        return sum(self.loss_token_mask())

    def loss_token_mask(self) -> list[bool]:
        """Per completion token: whether it enters the loss."""
        if self.masked:
            return [False] * len(self.completion_ids)
        if self.inserted is None or self.train_inserted:
            return [True] * len(self.completion_ids)
        return [not x for x in self.inserted]
