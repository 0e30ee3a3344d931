"""Which prompts a step generates, and on which weights: draw -> prune -> submit to the engines.

Synchronous (`rollout.async: false`): a step's rollouts are generated when the step takes them,
on the weights of the previous step. One-step-off (`async: true`): the controller submits step
t+1's rollouts before the learners train on step t, so generation and training overlap and a
sample is trained one policy version after the one that drew it (`max_staleness` allows more, so
weights are pushed less often). A checkpoint holds the data order up to its step; rollouts in
flight when a run stops are discarded and a resumed run generates them again, on the
checkpoint's weights.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from rl.data import PromptSampler
from rl.selection import Selector
from rollout.worker import Generation, RolloutGroup, Sampling, request_seeds


@dataclass
class StepRollouts:
    step: int
    batch: list[int]            # prompts drawn (dataset indices)
    kept: list[int]             # positions in `batch` generated (DPPO prunes the rest)
    prompt_weights: Tensor      # each generated prompt's 1/(1-p) weight
    policy_version: int         # optimizer steps behind the weights that sampled them
    sampler_state: dict         # the sampler right after this step's draw: what a checkpoint saves
    pending: Generation

    @property
    def generated(self) -> list[int]:
        return [self.batch[k] for k in self.kept]


class RolloutScheduler:
    def __init__(self, engines: RolloutGroup, sampler: PromptSampler, selector: Selector, prompts: list[list[int]],
                 prompts_per_step: int, sampling: Sampling, max_staleness: int, seed: int, policy_version: int):
        self.engines, self.sampler, self.selector, self.prompts = engines, sampler, selector, prompts
        self.prompts_per_step, self.sampling, self.max_staleness, self.seed = prompts_per_step, sampling, max_staleness, seed
        self.policy_version = policy_version  # of the weights the engines hold
        self.in_flight: StepRollouts | None = None
        self.mean_length: dict[int, float] = {}  # per prompt: mean completion length when last generated

    def submit(self, step: int) -> None:
        """Draw and prune step `step`'s prompts and start generating them on the engines' weights."""
        batch = self.sampler.next(self.prompts_per_step)
        kept, prompt_weights = self.selector.prune_prompts(step, batch)  # DPPO: from the history so far
        seeds = request_seeds(self.seed, step, len(batch))
        ids = [batch[k] for k in kept]
        typical = (sum(self.mean_length.values()) / len(self.mean_length) if self.mean_length
                   else self.sampling.max_new_tokens)
        expected = [len(self.prompts[i]) + self.mean_length.get(i, typical) for i in ids]
        pending = self.engines.submit([self.prompts[i] for i in ids], self.sampling, "train",
                                      [seeds[k] for k in kept], expected)
        self.in_flight = StepRollouts(step, batch, kept, prompt_weights, self.policy_version,
                                      self.sampler.state_dict(), pending)

    def take(self, step: int) -> tuple[StepRollouts, list[list[dict]]]:
        """Step `step`'s rollouts and their completion groups (submitted now unless already in flight)."""
        if self.in_flight is None or self.in_flight.step != step:
            self.submit(step)
        rollouts, self.in_flight = self.in_flight, None
        groups = self.engines.wait(rollouts.pending)
        for i, group in zip(rollouts.generated, groups):
            self.mean_length[i] = sum(len(c["token_ids"]) for c in group) / len(group)
        return rollouts, groups

    def needs_weights(self, learner_version: int) -> bool:
        return weights_due(learner_version, self.policy_version, self.max_staleness)


def weights_due(learner_version: int, engine_version: int, max_staleness: int) -> bool:
    """Whether the engines need newer weights before the next submission: its samples are trained
    once the learner is one version further on, and may then lag it by at most `max_staleness`."""
    return learner_version + 1 - engine_version > max_staleness
