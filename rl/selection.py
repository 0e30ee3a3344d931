"""Which completions the learner trains on, and with what weight.

Advantages are always computed on the full group first; selection then returns the indices of the
kept rows and a per-row weight, so old/ref log-prob passes run only for kept rows.
GRPO keeps everything with weight 1.
"""
from __future__ import annotations

import torch


def select_all(advantages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: every completion, weight 1."""
    n = advantages.shape[0]
    return torch.arange(n), torch.ones(n)


SELECTION_RULES = {"grpo": select_all}
