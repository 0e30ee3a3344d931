"""The distill stage's recipe section."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from launch.schema_base import OptimConfig, StageBase, Strict, WorkerDemand


class KCDConfig(Strict):
    """Knowledge condensation (compress/distill/kcd.py): draw prompts from a shrinking set of those
    the student is still least sure of."""
    interval: int = Field(10, ge=1, description="P: optimizer steps between two condensation rounds.")
    shrink: float = Field(0.05, gt=0, le=1, description="Each round keeps this fraction of the full prompt set less.")
    min_fraction: float = Field(
        0.7, gt=0, le=1, description="rho: the kept fraction of the prompt set stops shrinking here; 1 keeps every "
                                     "prompt (plain KD: the same draws, the same loss).")
    ema: float = Field(0.5, ge=0, lt=1, description="Weight of a prompt's earlier value in its running value "
                                                    "(0: its latest value only).")
    value: Literal["entropy", "divergence"] = Field(
        "entropy", description="A prompt's value: the student's mean token entropy on the sequence trained from "
                               "it, or the mean token distillation loss there.")


class LearnedNMConfig(Strict):
    """LBC learned N:M masks (compress/sparsify/learned_nm.py) on the student's Linear layers but the
    output head, learned while it distils; the stage's output is exactly N:M and its masks go on."""
    n: int = Field(2, ge=1, description="N: weights kept in every group of M consecutive input weights.")
    m: int = Field(4, ge=2, description="M: the group width; every Linear's input width must be a multiple of it.")
    mask_steps: float = Field(
        1.0, gt=0, le=1, description="Fraction of the stage's steps over which the cubic schedule removes "
                                     "candidates (from C(M, N) per group down to one); the remaining steps train "
                                     "under the final N:M mask.")

    @model_validator(mode="after")
    def _n_below_m(self):
        if self.n >= self.m:
            raise ValueError(f"N:M needs N < M, got {self.n}:{self.m}")
        return self


class DistillStage(StageBase):
    kind: Literal["distill"] = "distill"
    teacher: str | None = Field(
        None, description="The teacher: the name of a stage among `needs` (its output model), or a model folder / "
                          "hub name; None: the recipe's `model.path`. The student is this stage's input model.")
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="Token-level divergence: KL(teacher‖student), KL(student‖teacher), or the "
                                  "generalised Jensen-Shannon divergence with mixture `beta` (TRL's GKD convention).")
    beta: float = Field(0.5, ge=0, le=1, description="`jsd`: 0 is forward KL, 1 reverse KL.")
    temperature: float = Field(
        1.0, gt=0, description="Softmax temperature of both distributions in the loss, and of the sampled "
                               "completions (as in TRL's GKD).")
    steps: int = Field(100, ge=1, description="Optimizer steps.")
    prompts_per_step: int = Field(8, ge=1, description="Train prompts (one sequence each) per optimizer step.")
    max_new_tokens: int = Field(128, ge=1, description="Longest sampled completion.")
    sequences: Literal["teacher", "reference"] = Field(
        "teacher", description="Where the completions that are not on-policy come from: sampled by the teacher, "
                               "or the train split's reference text (`data.answer_key`) followed by EOS.")
    on_policy_fraction: float = Field(
        0.0, ge=0, le=1, description="lambda: the chance that a drawn prompt's completion is sampled by the student "
                                     "itself (on-policy distillation, GKD).")
    heldout_prompts: int = Field(
        16, ge=1, description="Eval-split prompts whose teacher samples measure the held-out KL(teacher‖student) "
                              "before and after.")
    kcd: KCDConfig | None = Field(None, description="Knowledge condensation; None: uniform prompt draws (plain KD).")
    learned_nm: LearnedNMConfig | None = Field(
        None, description="Learn N:M masks while distilling (LBC); None: keep the input's masks, if any. The "
                          "input must then carry no masks: one stage, one mask source.")
    ranks: int = Field(1, ge=1, description="DeepSpeed data-parallel ranks (Ray actors); each holds the teacher too.")
    num_cpus_per_rank: float = Field(1, ge=0, description="CPUs reserved for each rank.")
    num_gpus_per_rank: float = Field(0, ge=0, description="GPUs reserved for each rank (0: DeepSpeed on CPU, gloo).")
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage of the student.")
    max_tokens_per_microbatch: int = Field(
        4096, ge=16, description="Token budget of one micro-batch (rows x longest); bounds the [tokens, vocab] "
                                 "logits of both models held at once.")
    optim: OptimConfig = Field(OptimConfig(lr=1e-5), description="AdamW and its LR schedule.")

    def workers(self) -> list[WorkerDemand]:
        return [WorkerDemand("learner", f"stages.{self.name}", self.ranks, self.num_cpus_per_rank,
                             self.num_gpus_per_rank)]

    @model_validator(mode="after")
    def _on_policy_needs_whole_weights(self):
        if self.on_policy_fraction > 0 and self.zero_stage == 3:
            raise ValueError("on_policy_fraction > 0 samples from the student on every rank, which needs its whole "
                             "weights; ZeRO-3 partitions them: use zero_stage 0, 1 or 2")
        return self

    @model_validator(mode="after")
    def _learned_nm_needs_whole_weights(self):
        if self.learned_nm is not None and self.zero_stage == 3:
            raise ValueError("learned_nm reads every Linear weight and its candidate scores whole between steps "
                             "(the schedule's top-k, the final bake into the weights), outside ZeRO-3's gathers; "
                             "use zero_stage 0, 1 or 2")
        return self

    def learned_steps(self) -> int:
        """Optimizer steps over which `learned_nm` removes candidates."""
        return max(1, round(self.learned_nm.mask_steps * self.steps))
