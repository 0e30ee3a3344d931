"""Group-relative advantages (GRPO).

For a group of G completions of one prompt with rewards r_1..r_G:

    Â_i = (r_i − mean_G(r)) / (s + ε)

where s is chosen by `scale`:
    "group": std_G(r), the group's std with Bessel correction (divisor G − 1)
    "batch": the std of all rewards in the batch (Bessel), the mean still per group
    "none":  no division (Dr. GRPO), Â_i = r_i − mean_G(r)
"""
from __future__ import annotations

from torch import Tensor

SCALES = ("group", "batch", "none")


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Advantages [N] for rewards [N] laid out as N / group_size consecutive groups."""
    if scale not in SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; expected one of {SCALES}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a std needs two samples), got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")

    if not rewards.is_floating_point():
        rewards = rewards.float()
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (rewards.std() + eps)
    return centred.reshape(-1)
