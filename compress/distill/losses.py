"""Distillation losses: divergences between the teacher's and the student's next-token
distributions at the same positions of the same sequences.

With p = softmax(teacher_logits / T), q = softmax(student_logits / T), at each position:

    forward_kl   KL(p‖q) = Σ_v p_v (log p_v − log q_v)            covers every mode of the teacher
    reverse_kl   KL(q‖p) = Σ_v q_v (log q_v − log p_v)            the student picks modes
    jsd(β)       β·KL(p‖m) + (1−β)·KL(q‖m),  m = β·p + (1−β)·q    (0 < β < 1)
                 β = 0 is forward_kl, β = 1 is reverse_kl

This is the convention of TRL's `GKDTrainer.generalized_jsd_loss` (tests/test_distill.py checks
the two agree). The end points are defined, not limits: the mixture term itself tends to 0 as
β → 0 or 1. Like TRL, the loss carries no T² factor. `token_mean` reduces over the positions of a
mask, Σ m·ℓ / Σ m (TRL's `batchmean` with labels).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

LOSSES = ("forward_kl", "reverse_kl", "jsd")


def kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p‖q) over the last dimension, from log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1)


def generalized_jsd(student_logp: Tensor, teacher_logp: Tensor, beta: float) -> Tensor:
    """β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q; β = 0: KL(p‖q), β = 1: KL(q‖p)."""
    if beta == 0:
        return kl(teacher_logp, student_logp)
    if beta == 1:
        return kl(student_logp, teacher_logp)
    mixture = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))
    return beta * kl(teacher_logp, mixture) + (1 - beta) * kl(student_logp, mixture)


def token_divergence(student_logits: Tensor, teacher_logits: Tensor, loss: str, beta: float = 0.5,
                     temperature: float = 1.0) -> Tensor:
    """The divergence `loss` at every position ([..., V] logits -> [...]), in float32."""
    student_logp = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_logp = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if loss == "forward_kl":
        return kl(teacher_logp, student_logp)
    if loss == "reverse_kl":
        return kl(student_logp, teacher_logp)
    if loss == "jsd":
        return generalized_jsd(student_logp, teacher_logp, beta)
    raise ValueError(f"unknown distillation loss {loss!r}; one of {', '.join(LOSSES)}")


def token_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    """Σ m·ℓ / Σ m over all positions (0 when the mask is empty)."""
    return (per_token * mask).sum() / mask.sum().clamp_min(1)
