"""Loss aggregation: from per-token losses ℓ_{i,t} (mask m_{i,t}) to one scalar.

An optimizer batch is split into micro-batches (gradient accumulation × data-parallel ranks).
`aggregate` returns one micro-batch's contribution; the contributions of all micro-batches are
SUMMED to give the batch loss L. N = num_seqs and K = num_tokens are global counts over the
whole optimizer batch, M = num_microbatches, L_max = max_new_tokens, b indexes micro-batches:

    grpo:    L = (1/N) Σ_i (Σ_t m ℓ / Σ_t m)          mean over sequences of each one's token mean
    bnpo:    L = (1/M) Σ_b (Σ_{i∈b,t} m ℓ / Σ_{i∈b,t} m)   token mean per micro-batch, averaged
    dr_grpo: L = Σ_{i,t} m ℓ / (N · L_max)
    dapo:    L = Σ_{i,t} m ℓ / K                      token mean over the whole batch

grpo, dr_grpo and dapo do not depend on how sequences are split into micro-batches. bnpo does
(each micro-batch is normalised by its own token count): it matches TRL's `bnpo`, which averages
per-micro-batch token means over accumulation steps, and equals dapo only when every micro-batch
holds the same number of tokens.

Data-parallel engines (DeepSpeed, DDP) AVERAGE gradients over ranks; to get the sum this module
assumes, the caller scales each rank's loss by the world size (or divides the counts by it).
"""
from __future__ import annotations

from torch import Tensor

LOSS_AGG_MODES = ("grpo", "bnpo", "dr_grpo", "dapo")


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_seqs: int,
    num_tokens: int,
    max_new_tokens: int,
    num_microbatches: int,
) -> Tensor:
    """This micro-batch's share of the optimizer batch's loss (a scalar); see the module doc."""
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    if mode == "grpo":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.sum() / num_seqs
    if mode == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1) / num_microbatches
    if mode == "dr_grpo":
        return masked.sum() / (num_seqs * max_new_tokens)
    if mode == "dapo":
        return masked.sum() / max(num_tokens, 1)
    raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {LOSS_AGG_MODES}")
