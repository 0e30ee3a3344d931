"""Step-GRPO's step-aware relative reward: among a group's correct answers, fewer steps score more.

A completion's steps are k = 1 + its standalone trigger words ("Wait", not "Waiting"), counted
on the whole response. Over each group of G completions, mu = mean k of its correct completions
(or of all of them, `mu_over="all"`, the ablation), and a correct completion's accuracy score is
scaled by

    f_i = 1 - beta * tanh((k_i - mu) / mu)

so that with an accuracy weight alpha and a format weight 1 - alpha the total is the paper's
R_i = alpha * acc_i * f_i + (1 - alpha) * fmt_i. Incorrect completions, and every completion of a
group with no correct one, keep f = 1.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor


def count_steps(text: str, triggers: list[str]) -> int:
    """1 + the standalone occurrences of any trigger word in `text`."""
    words = "|".join(re.escape(t) for t in triggers)
    return 1 + len(re.findall(rf"(?<![A-Za-z])(?:{words})(?![A-Za-z])", text))


def efficiency_factors(steps: Tensor, correct: Tensor, group_size: int, beta: float,
                       mu_over: str = "correct") -> Tensor:
    """f per completion [B] (see the module doc); `steps` [B] and `correct` [B] bool, in groups of G."""
    k = steps.float().view(-1, group_size)
    ok = correct.bool().view(-1, group_size)
    counted = ok if mu_over == "correct" else torch.ones_like(ok)
    mu = (k * counted).sum(1, keepdim=True) / counted.sum(1, keepdim=True).clamp(min=1)
    factor = 1 - beta * torch.tanh((k - mu) / mu.clamp(min=1e-9))
    return torch.where(ok, factor, torch.ones_like(factor)).view(-1)


def step_aware_rewards(rewards: Tensor, accuracy: Tensor, accuracy_weight: float, factors: Tensor) -> Tensor:
    """The weighted reward with its accuracy term (weight * score) scaled by `factors`."""
    return rewards + accuracy_weight * accuracy * (factors - 1)
