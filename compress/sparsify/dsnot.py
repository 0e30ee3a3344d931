"""DSnoT: training-free refinement of a pruning mask by swapping weights, one revived per one pruned.

Per output row i, pruning shifts the row's expected output by the expected reconstruction error

    E[ε_i] = Σ_{j pruned} W_ij · E[x_j]

Each cycle, every row still active makes one swap:
    grow:  among pruned weights, revive r = argmax sign(E[ε_i]) · W_ir E[x_r] / Var(x_r)^γ
           (the largest move of E[ε_i] toward 0 per unit of input variance);
    prune: among kept weights whose contribution W_ij E[x_j] has the sign opposite to E[ε_i],
           remove the one with the smallest Wanda score |W_ij| · ‖X_j‖₂.
N:M: the pruned weight lies in the revived one's M-block (and only blocks that hold a prune
candidate may grow), so the pattern stays valid. One prune per grow keeps every row's count.

A row stops for good once |E[ε_i]| ≤ threshold (converged), or when its swap would not lower
|E[ε_i]| (the revived and pruned contributions together overshoot past -E[ε_i]); the swap is then
not made. So |E[ε_i]| never increases, and `max_cycle = 0` returns the initial mask.
All rows are processed at once; stopped rows are masked out.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from compress.sparsify.nm import blocks
from compress.sparsify.wanda import wanda_score

# Var(x_j) floor: a constant input channel would otherwise divide by zero.
VAR_FLOOR = 1e-12


class Refined(NamedTuple):
    keep: Tensor       # bool (out, in)
    error: Tensor      # E[ε_i] after refinement (out,)
    converged: Tensor  # bool (out,): |E[ε_i]| ≤ threshold


def expected_error(weight: Tensor, keep: Tensor, mean: Tensor) -> Tensor:
    """E[ε_i] = Σ_{j pruned} W_ij E[x_j] (out,), in float32."""
    return (weight.float() * mean.float() * ~keep).sum(1)


def dsnot_refine(weight: Tensor, keep: Tensor, mean: Tensor, var: Tensor, input_norm: Tensor, *,
                 max_cycle: int, threshold: float, gamma: float = 1.0,
                 n_m: tuple[int, int] | None = None) -> Refined:
    """Refine the keep-mask `keep` (out, in) of `weight` (out, in) given each input feature's mean,
    variance and ‖X_j‖₂ (in,); `threshold` is in the units of `mean`. See the module doc."""
    contribution = weight.float() * mean.float()
    grow_gain = contribution / var.float().clamp_min(VAR_FLOOR) ** gamma
    prune_score = wanda_score(weight, input_norm)
    keep = keep.clone()
    error = (contribution * ~keep).sum(1)
    active = error.abs() > threshold
    rows = torch.arange(weight.shape[0], device=weight.device)
    if n_m is not None:
        column_block = torch.arange(weight.shape[1], device=weight.device) // n_m[1]
    for _ in range(max_cycle):
        if not active.any():
            break
        sign = error.sign()[:, None]
        # Kept weights whose removal moves E[ε] toward 0; a revived weight never is one.
        prunable = keep & (contribution * sign < 0)
        grow = torch.where(keep, -torch.inf, grow_gain * sign)
        if n_m is not None:
            grow = grow.masked_fill(~blocks(prunable, n_m[1]).any(-1)[:, column_block], -torch.inf)
        gain, revived = grow.max(1)
        if n_m is not None:
            prunable &= column_block[None, :] == column_block[revived][:, None]
        lowest, pruned = torch.where(prunable, prune_score, torch.inf).min(1)
        new_error = error - contribution[rows, revived] + contribution[rows, pruned]
        swap = active & (gain > 0) & lowest.isfinite() & (new_error.abs() < error.abs())
        keep[rows[swap], revived[swap]] = True
        keep[rows[swap], pruned[swap]] = False
        error = torch.where(swap, new_error, error)
        active = swap & (error.abs() > threshold)
    return Refined(keep, error, error.abs() <= threshold)
