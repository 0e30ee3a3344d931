"""Squeeze10-style mixed 1-bit / 4-bit weights: OUR RECONSTRUCTION of an unreleased method (the
Squeeze10-LLM paper publishes no code); it follows the formulas of the spec, not the authors' code.

Within each group of g consecutive input columns of a row (g = the whole row when group_size is 0):

    α        = mean |w_ij| over the group's binarised weights
    PBAR_ij  = |w_ij − α·sign(w_ij)| · ‖X_j‖₂       the output change binarising w_ij would cause
    keep     = the k = round(keep_fraction · g) highest-PBAR weights: 4 bits, affine min/scale over
               the kept values of the group (16 levels)
    the rest = α·sign(w_ij) (sign(0) = +1: exactly two levels)

Stored packed (`storage_bits`): (1 − f)·1 + f·4 = 1.6 bits per weight of payload at f = 0.2 (the
paper's figure), plus a 1-bit selection bitmap and 48 bits per group (fp16 α, min and scale).

α and the selection depend on each other: start from α over every weight and alternate PBAR_ROUNDS
times. `magnitude` and `random` selections are the baselines PBAR is tested against. Weights a
sparsity mask prunes stay zero, are never selected and do not enter α.

`fit_binary_scale` then rescales each row's binarised part (all its groups' α by one factor c_i)
to match the layer's output on calibration inputs (see compress/quantize/layerwise.py, FIAS):

    c_i = argmin_c ‖T w_i − X (c·b_i + q_i)‖²  =  (b_iᵀ XᵀT w_i − b_iᵀ XᵀX q_i) / (b_iᵀ XᵀX b_i)

with b_i the row's binarised values, q_i its 4-bit values. It costs no storage: c_i·α_ig is stored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Selection = Literal["pbar", "magnitude", "random"]
# α from all weights, then from the binarised set of the first selection. A third round moves ~3% of
# the selection and changes the layer's output error by < 0.1% (random 256 x 512 layers).
PBAR_ROUNDS = 2
BITS = 4


@dataclass
class MixedWeight:
    weight: Tensor  # the dequantized weight (same shape and dtype as the input)
    kept: Tensor    # bool, True where the weight is stored in 4 bits
    valid: Tensor   # bool, False where a sparsity mask prunes the weight


def grouped(t: Tensor, group_size: int) -> Tensor:
    """(out, in) -> (out, in / g, g)."""
    g = group_size or t.shape[1]
    if t.shape[1] % g:
        raise ValueError(f"group_size {g} does not divide the {t.shape[1]} input columns")
    return t.reshape(t.shape[0], t.shape[1] // g, g)


def binary_scale(magnitude: Tensor, binarised: Tensor) -> Tensor:
    """α per group: mean |w| over the binarised weights (the L2-optimal scale of sign(w))."""
    return (magnitude * binarised).sum(-1, keepdim=True) / binarised.sum(-1, keepdim=True).clamp(min=1)


def top_per_group(score: Tensor, valid: Tensor, keep_fraction: float) -> Tensor:
    """True at the round(keep_fraction · g) highest-scoring valid entries of each group (at most
    the group's valid count)."""
    k = round(keep_fraction * score.shape[-1])
    if k == 0:
        return torch.zeros_like(valid)
    score = score.masked_fill(~valid, float("-inf"))
    top = torch.zeros_like(valid).scatter_(-1, score.topk(k, dim=-1).indices, True)
    return top & valid


def select(w: Tensor, norm: Tensor, valid: Tensor, keep_fraction: float, selection: Selection,
           generator: torch.Generator | None) -> Tensor:
    magnitude = w.abs()
    if selection == "magnitude":
        return top_per_group(magnitude, valid, keep_fraction)
    if selection == "random":
        return top_per_group(torch.rand(w.shape, generator=generator, device=w.device), valid, keep_fraction)
    kept = torch.zeros_like(valid)
    for _ in range(PBAR_ROUNDS):
        alpha = binary_scale(magnitude, valid & ~kept)
        kept = top_per_group((magnitude - alpha).abs() * norm, valid, keep_fraction)
    return kept


def affine_quantize(w: Tensor, kept: Tensor, bits: int = BITS) -> Tensor:
    """Round-to-nearest on 2**bits levels spanning [min, max] of each group's kept weights."""
    lo = w.masked_fill(~kept, float("inf")).amin(-1, keepdim=True)
    hi = w.masked_fill(~kept, float("-inf")).amax(-1, keepdim=True)
    lo, hi = torch.where(kept.any(-1, keepdim=True), lo, 0), torch.where(kept.any(-1, keepdim=True), hi, 0)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=torch.finfo(w.dtype).tiny)
    return lo + ((w - lo) / scale).round().clamp(0, 2**bits - 1) * scale


def mixed_quantize(weight: Tensor, input_norm: Tensor, *, keep_fraction: float, group_size: int,
                   selection: Selection = "pbar", valid: Tensor | None = None,
                   generator: torch.Generator | None = None) -> MixedWeight:
    """Quantize one Linear weight (out, in) given ‖X_j‖₂ of its input columns (in,); see the module doc."""
    w = grouped(weight.float(), group_size)
    norm = grouped(input_norm.float().reshape(1, -1), group_size)
    ok = torch.ones_like(w, dtype=torch.bool) if valid is None else grouped(valid.bool(), group_size)
    kept = select(w, norm, ok, keep_fraction, selection, generator)
    binarised = ok & ~kept
    alpha = binary_scale(w.abs(), binarised)
    sign = torch.where(w >= 0, 1.0, -1.0)
    out = torch.where(kept, affine_quantize(w, kept), torch.where(binarised, alpha * sign, 0.0))
    return MixedWeight(out.reshape(weight.shape).to(weight.dtype), kept.reshape(weight.shape),
                       ok.reshape(weight.shape))


def fit_binary_scale(weight: Tensor, mixed: MixedWeight, gram: Tensor, cross: Tensor) -> MixedWeight:
    """`mixed` with each row's binarised part rescaled to fit the layer output (module doc);
    gram = XᵀX, cross = XᵀT."""
    binarised = mixed.valid & ~mixed.kept
    w_hat = mixed.weight.float()
    b, q = w_hat * binarised, w_hat * ~binarised
    bg = b @ gram
    num = ((b @ cross) * weight.float()).sum(1) - (bg * q).sum(1)
    den = (bg * b).sum(1)
    c = torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), 1.0)
    return MixedWeight((q + c[:, None] * b).to(weight.dtype), mixed.kept, mixed.valid)


def storage_bits(mixed: MixedWeight, group_size: int, sparse: bool) -> dict[str, int]:
    """Bits to store one mixed weight packed: a 1-bit selection bitmap over every weight, a sign bit
    per binarised weight, a 4-bit code per kept weight, and per group an fp16 α and the fp16 min
    and scale of the 4-bit grid; with a sparsity mask, its 1-bit bitmap too."""
    groups = grouped(mixed.kept, group_size).shape[:2].numel()
    return {
        "selection_bitmap": mixed.kept.numel(),
        "sparsity_bitmap": mixed.kept.numel() if sparse else 0,
        "signs": int((mixed.valid & ~mixed.kept).sum()),
        "codes_4bit": BITS * int(mixed.kept.sum()),
        "alpha_fp16": 16 * groups,
        "min_scale_fp16": 32 * groups,
    }
