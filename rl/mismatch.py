"""Rollout/learner mismatch correction (truncated or masked importance sampling).

The rollout engine (vLLM) samples with π_rollout; the learner recomputes π_old on the same
tokens, and the two differ numerically. The policy term is reweighted by

    token level:    w_{i,t} = exp(logπ_old(o_{i,t}) − logπ_rollout(o_{i,t}))
    sequence level: w_i     = exp(Σ_t m_{i,t} (logπ_old − logπ_rollout)), broadcast to tokens

    tis: w ← clamp(w, c_min, c_max)        (truncated IS)
    mis: w ← w · 1[c_min ≤ w ≤ c_max]      (masked IS: out-of-range tokens/sequences dropped)

Stats (over masked tokens, token-weighted):
    mismatch_kl     mean of k3 with r = π_old/π_rollout: r − log r − 1, an unbiased estimate of
                    KL(π_rollout ‖ π_old) per token since the tokens were drawn from π_rollout
    is_weight_mean  mean of w after the correction
    is_clamped_frac (tis) / is_masked_frac (mis): fraction of tokens whose raw w left the range
"""
from __future__ import annotations

import torch
from torch import Tensor

from rl.policy_loss import k3_kl

MISMATCH_MODES = ("none", "tis", "mis")
MISMATCH_LEVELS = ("token", "sequence")


@torch.no_grad()
def mismatch_weights(
    old_logp: Tensor,
    rollout_logp: Tensor,
    mask: Tensor,
    *,
    mode: str,
    level: str,
    c_min: float,
    c_max: float,
) -> tuple[Tensor | None, dict[str, float]]:
    """Importance weights [B,T] (None for mode "none") and mismatch stats; see the module doc."""
    if mode not in MISMATCH_MODES:
        raise ValueError(f"unknown mismatch mode {mode!r}; expected one of {MISMATCH_MODES}")
    if level not in MISMATCH_LEVELS:
        raise ValueError(f"unknown mismatch level {level!r}; expected one of {MISMATCH_LEVELS}")

    mask = mask.bool()
    n_tokens = mask.sum().clamp(min=1)
    diff = torch.where(mask, old_logp - rollout_logp, torch.zeros_like(old_logp))
    kl = torch.where(mask, k3_kl(rollout_logp, old_logp), torch.zeros_like(old_logp))
    stats = {"mismatch_kl": kl.sum().div(n_tokens).item()}
    if mode == "none":
        return None, stats

    log_w = diff.sum(-1, keepdim=True).expand_as(diff) if level == "sequence" else diff
    raw = torch.exp(log_w)  # may be inf for long sequences; clamp and range test handle it
    outside = (raw < c_min) | (raw > c_max)
    if mode == "tis":
        weights = raw.clamp(c_min, c_max)
        stats["is_clamped_frac"] = (outside & mask).sum().div(n_tokens).item()
    else:
        weights = torch.where(outside, torch.zeros_like(raw), raw)
        stats["is_masked_frac"] = (outside & mask).sum().div(n_tokens).item()
    weights = torch.where(mask, weights, torch.zeros_like(weights))
    stats["is_weight_mean"] = weights.sum().div(n_tokens).item()
    return weights, stats
