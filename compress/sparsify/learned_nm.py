"""Learned N:M masks (LBC, learning best combination), for the last steps of RL or distillation.

Each group of M consecutive input weights of a row has K = C(M, N) candidate keep-sets (6 for
2:4), each with a learnable score. The effective mask keeps a weight when any surviving candidate
of its group covers it, so with all K candidates alive the mask is dense. Forward: w_eff = w ⊙ mask.
Backward (straight-through for the hard mask):

    ∂L/∂w     = ∂L/∂w_eff ⊙ mask
    ∂L/∂s_k   = Σ_{j ∈ candidate k} ∂L/∂w_eff_j · w_j      (alive candidates; 0 for removed ones)

∂L/∂w_eff_j · w_j is the first-order change of L per unit of mask on weight j, so gradient
descent raises the scores of candidates whose weights lower the loss. Scores start at the
candidate's Σ|w_j| (magnitude pruning when nothing is learned). A cubic schedule over
`total_steps` leaves alive(t) = 1 + round((K - 1)(1 - t/T)³) candidates per group, removing the
lowest-scoring ones; from t = T one remains, the layer is exactly N:M and its scores freeze.

Usage:
    learned = LearnedNM.attach(model, 2, 4, total_steps)   # before building the optimizer
    for t in range(steps): loss.backward(); optimizer.step(); learned.step(t + 1)
    masks = learned.finalize()                             # w ⊙ mask baked into the weights
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from compress.sparsify.nm import blocks, check_n_m


def candidate_sets(n: int, m: int) -> Tensor:
    """(C(M, N), M) bool: every way to keep N of M."""
    combinations = list(itertools.combinations(range(m), n))
    sets = torch.zeros(len(combinations), m, dtype=torch.bool)
    for k, kept in enumerate(combinations):
        sets[k, list(kept)] = True
    return sets


def covered(alive: Tensor, candidates: Tensor) -> Tensor:
    """(out, in) mask: weights covered by an alive candidate of their group; alive is (out, groups, K)."""
    return (alive[..., None] & candidates).any(-2).flatten(1)


class _MaskedWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, scores, alive, candidates):
        mask = covered(alive, candidates)
        ctx.save_for_backward(weight, mask, alive, candidates)
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        weight, mask, alive, candidates = ctx.saved_tensors
        per_weight = blocks((grad * weight).float(), candidates.shape[1])
        grad_scores = (per_weight @ candidates.T.float()) * alive
        return grad * mask, grad_scores, None, None


class CandidateMask(nn.Module):
    """Parametrization of one Linear weight (out, in) by the N:M candidate scores of its groups."""

    def __init__(self, weight: Tensor, n: int, m: int):
        super().__init__()
        check_n_m(n, m, weight.shape[1])
        candidates = candidate_sets(n, m).to(weight.device)
        self.register_buffer("candidates", candidates)
        magnitude = blocks(weight.detach().float().abs(), m) @ candidates.T.float()
        self.scores = nn.Parameter(magnitude)
        self.register_buffer("alive", torch.ones_like(magnitude, dtype=torch.bool))

    def forward(self, weight: Tensor) -> Tensor:
        return _MaskedWeight.apply(weight, self.scores, self.alive, self.candidates)

    def mask(self) -> Tensor:
        return covered(self.alive, self.candidates)

    @torch.no_grad()
    def keep_top(self, count: int) -> None:
        """Keep the `count` highest-scoring alive candidates of each group; freeze at one."""
        if count < int(self.alive.sum(-1).max()):
            top = self.scores.masked_fill(~self.alive, -torch.inf).topk(count, dim=-1).indices
            self.alive = torch.zeros_like(self.alive).scatter_(-1, top, True)
        if count == 1:
            self.scores.requires_grad_(False)


class LearnedNM:
    """N:M masks learned on the Linear layers of a model being trained (see the module doc)."""

    def __init__(self, model: nn.Module, masks: dict[str, CandidateMask], total_steps: int):
        self.model, self.masks, self.total_steps = model, masks, total_steps
        self.num_candidates = next(iter(masks.values())).candidates.shape[0]

    @classmethod
    def attach(cls, model: nn.Module, n: int, m: int, total_steps: int,
               modules: Iterable[str] | None = None) -> LearnedNM:
        """Parametrize `modules` (names of nn.Linear; default every Linear but the output embedding)."""
        if total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {total_steps}")
        if modules is None:
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            modules = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and mod is not head]
        masks = {}
        for name in modules:
            linear = model.get_submodule(name)
            masks[name] = CandidateMask(linear.weight, n, m)
            parametrize.register_parametrization(linear, "weight", masks[name])
        if not masks:
            raise ValueError("no Linear module to learn an N:M mask for")
        return cls(model, masks, total_steps)

    def parameters(self) -> list[nn.Parameter]:
        """The candidate scores (already among model.parameters() once attached)."""
        return [mask.scores for mask in self.masks.values()]

    def alive_per_group(self, step: int) -> int:
        remaining = (1 - min(step, self.total_steps) / self.total_steps) ** 3
        return 1 + round((self.num_candidates - 1) * remaining)

    def step(self, step: int) -> None:
        """Apply the schedule after optimizer step `step` (1-based)."""
        for mask in self.masks.values():
            mask.keep_top(self.alive_per_group(step))

    @torch.no_grad()
    def finalize(self) -> dict[str, Tensor]:
        """End the schedule, bake w ⊙ mask into the weights, remove the parametrizations; returns the
        bool keep-masks keyed by weight parameter name."""
        self.step(self.total_steps)
        keep = {}
        for name, mask in self.masks.items():
            keep[f"{name}.weight"] = mask.mask().cpu()
            parametrize.remove_parametrizations(self.model.get_submodule(name), "weight", leave_parametrized=True)
        return keep
