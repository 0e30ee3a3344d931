"""Keep-masks from per-weight scores: the top of each output row (unstructured) or the top N of
every block of M consecutive input columns (N:M), and a check that a mask is N:M."""
from __future__ import annotations

import torch
from torch import Tensor


def check_n_m(n: int, m: int, in_features: int) -> None:
    if not 0 < n < m:
        raise ValueError(f"N:M sparsity needs 0 < N < M, got {n}:{m}")
    if in_features % m:
        raise ValueError(f"N:M sparsity with M={m} needs the input width ({in_features}) to be a multiple of M")


def blocks(t: Tensor, m: int) -> Tensor:
    """(rows, in) viewed as (rows, in / m, m): the M-blocks of consecutive input columns."""
    return t.reshape(t.shape[0], -1, m)


def keep_top(score: Tensor, sparsity: float | None = None, n_m: tuple[int, int] | None = None) -> Tensor:
    """Bool keep-mask, exactly one of: drop the int(in · sparsity) lowest scores of each row, or keep
    the N highest of every M-block."""
    if (sparsity is None) == (n_m is None):
        raise ValueError("give exactly one of sparsity and n_m")
    keep = torch.ones_like(score, dtype=torch.bool)
    if n_m is not None:
        n, m = n_m
        check_n_m(n, m, score.shape[1])
        dropped = blocks(score, m).topk(m - n, dim=-1, largest=False).indices
        blocks(keep, m).scatter_(-1, dropped, False)
        return keep
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    drop = int(score.shape[1] * sparsity)
    if drop:
        keep.scatter_(1, score.topk(drop, dim=1, largest=False).indices, False)
    return keep


def is_n_m(keep: Tensor, n: int, m: int) -> bool:
    """Whether every M-block of every row keeps exactly N weights."""
    return keep.shape[1] % m == 0 and bool((blocks(keep, m).sum(-1) == n).all())
