"""Which rows the learner trains on, with what weight, and what the loss divides by.

Two levels, each a method in its own file of pure functions:
    prompts     (before generation)  none | dppo            -> which drawn prompts are generated
    completions (after scoring)      all (grpo) | cppo | dppo -> which completions are trained

Advantages are always computed on the full generated group first. A `Selection` carries the kept
rows, their weights and the loss normalisers (rl/aggregation.py's N and K), because the right
normaliser depends on the method: CPPO normalises over the kept rows, DPPO over the full batch
(so that its 1/(1−p) reweighting is unbiased), GRPO over everything.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from rl.rows import TrainingRow
from rl.selection.cppo import allocated_prompts, cppo_keep
from rl.selection.dppo import PromptHistory, dppo_keep_completions, sample_kept
from rl.selection.grpo import keep_all


@dataclass(frozen=True)
class Selection:
    kept: Tensor        # [K] long: indices into the step's generated completions
    weights: Tensor     # [K] float: multiplies each kept row's token loss
    num_seqs: float     # loss normalisers for rl/aggregation.py
    num_tokens: float


class Selector:
    """Applies a stage's `selection` config step by step; its only state is DPPO's prompt history.

    Random draws come from a generator seeded by (seed, step, level), so a resumed run repeats
    exactly what an uninterrupted one would have drawn.
    """

    def __init__(self, cfg, group_size: int, seed: int):
        self.cfg, self.group_size, self.seed = cfg, group_size, seed
        prompts = cfg.prompts
        self.history = PromptHistory(prompts.history_decay) if prompts.method == "dppo" else None

    def prompts_per_step(self, prompts_per_step: int) -> int:
        """Prompts drawn per step: B, or B / (1 − P) under CPPO's dynamic completion allocation."""
        c = self.cfg.completions
        return allocated_prompts(prompts_per_step, c.rate) if c.method == "cppo" and c.allocation else prompts_per_step

    def prune_prompts(self, step: int, prompt_ids: list[int]) -> tuple[list[int], Tensor]:
        """Positions (into `prompt_ids`) to generate for, and each one's weight 1/(1 − p_q)."""
        if self.history is None:
            return list(range(len(prompt_ids))), torch.ones(len(prompt_ids))
        p = self.cfg.prompts
        probs = self.history.probabilities(prompt_ids, p.rate, p.max_prob)
        kept, weights = sample_kept(probs, self._generator(step, 0), p.deterministic)
        if not kept.any():  # a step needs something to train on: keep the least likely pruned one
            least = int(torch.argmin(probs))
            kept[least], weights[least] = True, 1.0
        positions = kept.nonzero().flatten().tolist()
        return positions, weights[positions].float()

    def record(self, prompt_ids: list[int], rewards: Tensor) -> None:
        """Feed the generated prompts' rewards into the prompt history."""
        if self.history is not None:
            self.history.update(prompt_ids, rewards, self.group_size)

    def completions(self, step: int, rows: list[TrainingRow], prompt_weights: Tensor,
                    drawn_prompts: int) -> tuple[list[TrainingRow], Selection]:
        """The rows to train (weights set) and the `Selection` behind them.

        rows: every generated completion, G per generated prompt, advantages already on the full
        group; prompt_weights: each generated prompt's weight; drawn_prompts: prompts drawn this
        step, before prompt pruning.
        """
        c, G = self.cfg.completions, self.group_size
        advantages = torch.tensor([r.advantage for r in rows])
        row_weights = prompt_weights.repeat_interleave(G)
        weighted_tokens = row_weights * torch.tensor([float(r.loss_tokens) for r in rows])
        # Normalise by the full batch's counts; the tokens of pruned prompts are estimated by their
        # 1/(1-p) reweighting (exact when no prompt was pruned). CPPO instead counts the kept rows.
        num_seqs, num_tokens = float(drawn_prompts * G), weighted_tokens.sum().item()
        if c.method == "all":
            kept = keep_all(advantages)
            weights = torch.ones(len(kept))
        elif c.method == "cppo":
            kept = cppo_keep(advantages, G, c.rate, c.rule)
            weights = torch.ones(len(kept))
            num_seqs, num_tokens = row_weights[kept].sum().item(), weighted_tokens[kept].sum().item()
        elif c.method == "dppo":
            kept, weights = dppo_keep_completions(advantages, G, c.rate, c.max_prob, self._generator(step, 1),
                                                  c.deterministic)
        else:
            raise ValueError(f"unknown completion selection {c.method!r}")
        selection = Selection(kept, weights * row_weights[kept], num_seqs, num_tokens)
        return ([replace(rows[j], weight=w) for j, w in zip(kept.tolist(), selection.weights.tolist())],
                selection)

    def _generator(self, step: int, level: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step * 2 + level) % 2**63)

    def state_dict(self) -> dict:
        return {"history": self.history.state_dict()} if self.history is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.history is not None and "history" in state:
            self.history.load_state_dict(state["history"])
