"""Wanda: prune by weight magnitude times input activation norm, compared within each output row.

    S_ij = |W_ij| · ‖X_j‖₂        X_j: input feature j over all calibration tokens

Unstructured: each row drops its int(in · s) lowest scores, so every row keeps the same count.
N:M: every block of M consecutive input columns keeps its N highest scores. No weight update.
Magnitude pruning is the same selection with ‖X_j‖ = 1.
"""
from __future__ import annotations

from torch import Tensor

from compress.sparsify.nm import keep_top


def wanda_score(weight: Tensor, input_norm: Tensor) -> Tensor:
    """S = |W| · ‖X_j‖ (out, in), in float32."""
    return weight.float().abs() * input_norm.float()


def wanda_mask(weight: Tensor, input_norm: Tensor, sparsity: float | None = None,
               n_m: tuple[int, int] | None = None) -> Tensor:
    """Bool keep-mask (out, in) of `weight` (out, in) given ‖X_j‖₂ (in,); exactly one of `sparsity`
    (fraction dropped per row) and `n_m` ((N, M): N kept per M-block)."""
    return keep_top(wanda_score(weight, input_norm), sparsity, n_m)
