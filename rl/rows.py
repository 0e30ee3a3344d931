"""What the controller hands the learner: one typed row per trained completion."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainingRow:
    prompt_ids: list[int]
    completion_ids: list[int]
    rollout_logprobs: list[float] | None  # the engine's per-token log-probs; None: unknown (ratio 1)
    advantage: float
    weight: float = 1.0    # selection's reweighting (DPPO: 1/(1-p)); multiplies the whole token loss
    masked: bool = False   # in no loss term (a truncated completion under `mask_truncated`)

    @property
    def length(self) -> int:
        """Tokens the learner's forward pass reads."""
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def loss_tokens(self) -> int:
        """Tokens that enter the loss."""
        return 0 if self.masked else len(self.completion_ids)
