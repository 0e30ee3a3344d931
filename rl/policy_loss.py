"""Per-token GRPO loss: the clipped surrogate, the k3 KL to a reference, and their sum.

With ρ = exp(logπ_θ − logπ_old) and advantage A (one per sequence, broadcast over its tokens):

    ℓ_policy = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A)
    KL_k3    = exp(ref − logπ_θ) − (ref − logπ_θ) − 1
    ℓ        = s · (w · ℓ_policy + β · KL_k3)

w are the rollout-mismatch importance weights (no gradient; policy term only), β the KL
coefficient, s an optional per-sequence weight (pruning reweighting). Padding tokens are zeroed.
Aggregating ℓ over tokens and sequences is rl/aggregation.py's job.
"""
from __future__ import annotations

import torch
from torch import Tensor


def clipped_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, Tensor]:
    """Per-token −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) [B,T] and the `clipped` mask [B,T].

    `clipped` marks tokens where the min picks the clipped term strictly, i.e. where the
    gradient through ρ is zero: (A > 0 and ρ > 1+ε_high) or (A < 0 and ρ < 1−ε_low).
    Ratios outside the range on the side that does not bind (e.g. A > 0, ρ < 1−ε_low) are
    not clipped: the unclipped term is the min there and still carries gradient.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages
    loss = -torch.min(unclipped, clipped)
    with torch.no_grad():
        is_clipped = ((advantages > 0) & (ratio > 1 + eps_high)) | ((advantages < 0) & (ratio < 1 - eps_low))
    return loss, is_clipped


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 estimator of KL(π_θ ‖ π_ref) on tokens sampled from π_θ: exp(d) − d − 1, d = ref − logπ.

    Non-negative, and zero exactly where the two log-probabilities agree.
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def token_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    kl_coef: float = 0.0,
    ref_logp: Tensor | None = None,
    is_weights: Tensor | None = None,
    seq_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Full per-token loss ℓ = s · (w · ℓ_policy + β · KL_k3) [B,T], zero on padding.

    Returns it with detached per-token stats: "clipped" (bool), "ratio", "policy" (s · w · ℓ_policy,
    the loss without its KL term) and, when β > 0, "kl".
    """
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp (the reference model's per-token logprobs)")

    policy, is_clipped = clipped_policy_loss(logp, old_logp, advantages, eps_low, eps_high)
    stats = {"clipped": is_clipped, "ratio": torch.exp(logp - old_logp).detach()}
    if is_weights is not None:
        policy = policy * is_weights.detach()
    loss = policy
    if kl_coef > 0:
        kl = k3_kl(logp, ref_logp)
        loss = loss + kl_coef * kl
        stats["kl"] = kl.detach()
    if seq_weights is not None:
        loss = loss * seq_weights.detach().unsqueeze(-1)
        policy = policy * seq_weights.detach().unsqueeze(-1)
    # where, not multiply: keeps the value finite even if padding holds non-finite logprobs.
    zero = torch.zeros_like(loss)
    stats["policy"] = torch.where(mask.bool(), policy.detach(), zero)
    return torch.where(mask.bool(), loss, zero), stats
