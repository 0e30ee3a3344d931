"""The recipe schema: the single source of every default.

A recipe is one YAML file. It is parsed into `Recipe`; unknown keys are errors. Each stage kind is
one entry of `STAGE_KINDS` (its config class and its runner): the `stages` union, the graph runner
and the docs generator all read it.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

import regex
from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from launch.schema_base import (NAME_MAX_LENGTH, RUN_DIR_ENTRIES, SEED_LIMIT, OptimConfig, RecipeName,  # noqa: F401
                                StageBase, StageKind, Strict, WorkerDemand, clip, name_problem)


# ---------------------------------------------------------------- model and data

class ModelConfig(Strict):
    path: str = Field(description="Hugging Face model folder, or a hub name (clusters).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="Weights dtype for the learner and the rollout engines.")
    trust_remote_code: bool = False


# Local data files by extension, and the `datasets` builder that reads each (rl/data.py).
DATA_FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataSource(Strict):
    path: str = Field(description="Local .jsonl/.json/.parquet/.csv file, or a Hugging Face dataset name. A .json "
                                  "file is a JSON array of rows, one object or JSON Lines; a .csv file has a header "
                                  "row, and its cells are read as text.")
    config: str | None = Field(None, description="Dataset config name for hub datasets (e.g. `main`).")
    split: str = Field("train", description="Split to read (hub datasets; ignored for local files).")
    limit: int | None = Field(None, ge=1, description="Use only the first N rows.")
    question_key: str | None = Field(None, description="This split's own `data.question_key` (None: the shared one).")
    answer_key: str | None = Field(None, description="This split's own `data.answer_key` (None: the shared one).")
    answer_format: Literal["gsm8k", "boxed", "raw"] | None = Field(
        None, description="This split's own `data.answer_format` (None: the shared one).")


# What a split may set for itself (a train and an eval dataset with different columns).
SPLIT_KEYS = ("question_key", "answer_key", "answer_format")


class DataConfig(Strict):
    train: DataSource
    eval: DataSource
    question_key: str = Field(
        "question", description="Column holding the problem text; a dotted path reads a nested field "
                                "(`prompt.0.content`: an array item by its index).")
    answer_key: str = Field(
        "answer", description="Column holding the reference answer; a dotted path reads a nested field "
                              "(`reward_model.ground_truth`, DAPO-Math-17k's layout). A column named with the dots "
                              "itself comes first.")
    answer_format: Literal["gsm8k", "boxed", "raw"] = Field(
        "gsm8k", description="How the answer field becomes the reference: `gsm8k`: the answer after the last "
                             "`####` (GSM8K's answer column; text without `####` is only stripped); `boxed`: the "
                             "content of the last `\\boxed{}` (MATH's solution column; a row without one is an "
                             "error); `raw`: the field stripped, as written.")
    template: str = Field("{question}", description="User message; `{question}` is replaced.")
    system_prompt: str | None = Field(None, description="System message (chat template only).")
    chat_template: bool = Field(True, description="Wrap the prompt with the tokenizer's chat template.")
    max_prompt_tokens: int = Field(512, ge=1, description="Longer prompts are left-truncated.")

    def for_split(self, split: str) -> DataConfig:
        """This section with the split's own keys (where it sets them) in place of the shared ones."""
        source = getattr(self, split)
        return self.model_copy(update={k: getattr(source, k) for k in SPLIT_KEYS if getattr(source, k) is not None})

    @field_validator("template")
    @classmethod
    def _has_placeholder(cls, v: str) -> str:
        if "{question}" not in v:
            raise ValueError("must contain the placeholder {question}")
        return v


# ---------------------------------------------------------------- cluster and logging

class LivenessConfig(Strict):
    """How long the driver waits on workers before it reports them stuck or dead."""
    startup_timeout_s: float = Field(
        600, gt=0, description="Actors placed and ready, including waiting for resources.")
    call_timeout_s: float = Field(
        1800, gt=0, description="Any single worker call: generate, train, checkpoint.")
    probe_interval_s: float = Field(5, gt=0, description="Health checks of workers while waiting.")


class ClusterConfig(Strict):
    address: str | None = Field(
        None, description="Ray address (`auto`: the cluster `ray start` runs on this machine); None uses "
                          "RAY_ADDRESS, else starts a private local Ray bound to 127.0.0.1.")
    num_cpus: int | None = Field(
        None, ge=1, description="Logical CPUs of a local Ray (None: the machine's).")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a local Ray (None: detected).")
    run_root: str | None = Field(
        None, description="Folder under which runs are created as `<run_root>/<name>-<timestamp>`; None: the "
                          "PRUNERL_RUN_ROOT environment variable, else `./runs` (when the working dir is inside "
                          "Ray's temp dir, as for `ray job submit --working-dir`, `~/prunerl-runs`).")
    max_restarts: int = Field(
        1, ge=0, description="Times a run restarts its workers and continues from the last checkpoint after "
                             "a worker failure before it stops.")
    on_stage_failure: Literal["cancel", "finish"] = Field(
        "cancel", description="When a stage fails: `cancel` stops the stages still running; `finish` lets "
                              "stages that do not need the failed one run to the end. Stages that need it are "
                              "skipped either way; the run fails.")
    liveness: LivenessConfig = Field(
        LivenessConfig(), description="Time limits on workers; over one, the run reports the stuck worker.")


class WandbConfig(Strict):
    mode: Literal["online", "offline", "disabled"] = Field(
        "offline", description="W&B mode; the WANDB_MODE environment variable overrides it.")
    project: str = "prunerl"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = []


class LoggingConfig(Strict):
    wandb: WandbConfig = WandbConfig()
    progress: bool = Field(True, description="One progress line per RL step on stdout.")
    worker_logs: bool = Field(
        False, description="Forward Ray workers' output (vLLM, DeepSpeed) to the console; "
                           "otherwise it stays in Ray's session log folder.")


# ---------------------------------------------------------------- stages

class AdvantageConfig(Strict):
    scale: Literal["group", "batch", "none"] = Field(
        "group", description="Divide by the group std, the batch std, or nothing (Dr. GRPO).")
    eps: float = Field(1e-4, gt=0, description="Added to the std before dividing.")


class MismatchConfig(Strict):
    mode: Literal["none", "tis", "mis"] = Field(
        "none", description="Rollout/learner mismatch correction: truncate (tis) or mask (mis).")
    level: Literal["token", "sequence"] = "sequence"
    c_min: float = Field(0.0, ge=0)
    c_max: float = Field(3.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self):
        if self.c_min >= self.c_max:
            raise ValueError(f"c_min ({self.c_min}) must be below c_max ({self.c_max})")
        return self


class LossConfig(Strict):
    eps_low: float = Field(0.2, ge=0, lt=1, description="Lower clip range of the ratio.")
    eps_high: float = Field(0.2, ge=0, description="Upper clip range (clip-higher: 0.28).")
    kl_coef: float = Field(0.0, ge=0, description="beta of the k3 KL to the reference; 0 loads no reference model.")
    agg: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field(
        "grpo", description="Loss aggregation (see rl/aggregation.py).")
    iterations: int = Field(1, ge=1, description="mu: optimizer passes over each batch.")
    mask_truncated: bool = Field(False, description="Drop completions cut at max_new_tokens from the loss.")
    train_inserted: bool = Field(
        True, description="Truncated rollouts: text the rollout inserted (closing tags, re-appended triggers) "
                          "carries policy-gradient loss like sampled text (as in the Step-GRPO authors' code); "
                          "its mismatch ratio is 1 either way (no engine log-prob).")
    mismatch: MismatchConfig = MismatchConfig()


class WeightSyncConfig(Strict):
    transport: Literal["file", "collective"] = Field(
        "file", description="How weights reach the engines: `file` (learner rank 0 writes safetensors that every "
                            "engine reloads; one node or a shared filesystem) or `collective` (learner rank 0 "
                            "broadcasts them over a process group with the engines' vLLM workers: gloo on CPU, "
                            "NCCL on GPU; learners and engines on the same kind of device).")
    bucket_mb: float = Field(
        256, gt=0, description="collective: the most weight data flattened into one broadcast.")
    timeout_s: float = Field(300, gt=0)


class TruncationConfig(Strict):
    """Step-GRPO's dynamic truncated rollout (rollout/truncation.py); training rollouts only."""
    enabled: bool = Field(False, description="Probe the model's confidence at each step trigger and cut the "
                                             "thinking short when the answer is already certain.")
    think_end: str = Field("</think>", min_length=1, description="Closes the thinking block.")
    think_budget: float = Field(0.9, gt=0, lt=1, description="Fraction of max_new_tokens thinking may use.")
    probe_text: str = Field("\n**Final Answer**\n\\boxed", min_length=1,
                            description="Appended after the thinking so far to elicit the answer.")
    probe_tokens: int = Field(20, ge=2, description="Greedy tokens a probe decodes at most.")
    threshold: float = Field(0.95, ge=0, le=1, description="δ: exit when the probe's confidence (geometric mean "
                                                            "of its token probabilities, the first skipped) is above it.")
    strict: bool = Field(True, description="Confidence 0 unless the probe closes the thinking block itself.")
    near_budget_tokens: int = Field(50, ge=0, description="Exit at a probe when thinking is this close to its budget.")
    max_probes: int = Field(10, ge=0, description="After this many failed probes, think to the natural end.")
    repeat_chunks: int = Field(3, ge=2, description="This many identical thinking chunks in a row exit to the answer.")
    answer_text: str = Field("\n</think>\n\n", min_length=1,
                             description="Inserted before the answer when the rollout ends the thinking.")


class RolloutConfig(Strict):
    engines: int = Field(1, ge=1, description="Number of vLLM engines (Ray actors).")
    num_cpus_per_engine: float = Field(1, ge=0)
    num_gpus_per_engine: float = Field(0, ge=0)
    temperature: float = Field(
        1.0, gt=0, description="Sampling temperature; the learner scores tokens under the same temperature.")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1)
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    cpu_kvcache_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE for CPU engines.")
    enforce_eager: bool = True
    weight_sync: WeightSyncConfig = WeightSyncConfig()
    async_: bool = Field(
        False, alias="async",
        description="One-step-off pipeline: the engines generate step t+1 while the learners train on step t "
                    "(samples are then one policy version old; loss.mismatch defaults to tis).")
    max_staleness: int = Field(
        1, ge=1, description="With async: the most policy versions a trained sample may lag the learner; "
                             "weights reach the engines only when the next rollouts would lag more.")
    truncation: TruncationConfig = TruncationConfig()


class LearnerConfig(Strict):
    ranks: int = Field(1, ge=1, description="DeepSpeed data-parallel ranks (Ray actors).")
    num_cpus_per_rank: float = Field(1, ge=0)
    num_gpus_per_rank: float = Field(0, ge=0)
    zero_stage: Literal[0, 1, 2, 3] = 0
    max_tokens_per_microbatch: int = Field(8192, ge=16, description="Token budget of one micro-batch.")
    logprob_chunk_tokens: int = Field(
        2048, ge=1, description="Completion tokens per chunk of the output head: bounds the [tokens, vocab] "
                                "logits held at once (each chunk is recomputed in backward).")
    gradient_checkpointing: bool = False
    offload_optimizer: bool = Field(
        False, description="ZeRO 1-3: the fp32 master weights and AdamW state live in CPU memory and the "
                           "optimizer steps there (torch AdamW), freeing ~12 bytes per parameter on the GPU.")
    optim: OptimConfig = OptimConfig()

    @model_validator(mode="after")
    def _offload_needs_zero(self):
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3 (ZeRO-Offload partitions the optimizer)")
        return self


VERIFIER_OPTIONS = {"gsm8k_accuracy": {"exact_score", "equivalent_score"}, "format": {"pattern"},
                    "boxed_accuracy": {"exact_score", "equivalent_score"}, "boxed_format": set()}
# Verifiers that judge the answer: the first of them among the terms defines `correct` by default.
ACCURACY_VERIFIERS = ("gsm8k_accuracy", "boxed_accuracy")


class RewardTerm(Strict):
    verifier: Literal["gsm8k_accuracy", "format", "boxed_accuracy", "boxed_format"] = Field(
        description="A verifier from `rewards`: `gsm8k_accuracy` (the `####`, boxed or last number of the "
                    "completion), `boxed_accuracy` (the last `\\boxed{}` only, for MATH-style answers), "
                    "`format` (a regex over the whole completion), `boxed_format` (1 if the last `\\boxed{}` "
                    "is complete).")
    weight: float = 1.0
    pattern: str | None = Field(
        None, description="`format` only: the regex a completion must match fully (default: the CPPO paper's).")
    exact_score: float | None = Field(
        None, description="`gsm8k_accuracy`, `boxed_accuracy` only: score when the answer string equals the "
                          "reference (default 1).")
    equivalent_score: float | None = Field(
        None, description="`gsm8k_accuracy`, `boxed_accuracy` only: score when math-verify finds them equal "
                          "(default 1).")

    @model_validator(mode="after")
    def _options_fit_verifier(self):
        given = {k for k in ("pattern", "exact_score", "equivalent_score") if getattr(self, k) is not None}
        wrong = sorted(given - VERIFIER_OPTIONS[self.verifier])
        if wrong:
            raise ValueError(f"verifier '{self.verifier}' takes no option {', '.join(wrong)}")
        if self.pattern is not None:
            try:  # `regex`, not `re`: the format verifier runs patterns with `regex` (it has timeouts)
                regex.compile(self.pattern)
            except regex.error as e:
                raise ValueError(f"pattern is not a valid regular expression: {e}") from None
        return self


class StepAwareConfig(Strict):
    """Step-GRPO's step-aware relative reward (rl/step_reward.py): the accuracy term of a correct
    completion is scaled by 1 - beta*tanh((k - mu)/mu), k its steps, mu the group's mean steps."""
    beta: float = Field(0.5, ge=0, le=1, description="Strength of the step reward; 0 turns it off (ablation).")
    mu_over: Literal["correct", "all"] = Field(
        "correct", description="mu: mean steps over the group's correct completions (paper), or all of them (ablation).")


class RewardConfig(Strict):
    terms: list[RewardTerm] = Field(
        default_factory=lambda: [RewardTerm(verifier="gsm8k_accuracy")], min_length=1)
    accuracy: str | None = Field(
        None, validate_default=True,
        description="The term's verifier whose score > 0 makes a completion correct (`reward/accuracy`); "
                    f"None: the first term whose verifier is one of {', '.join(ACCURACY_VERIFIERS)}, "
                    "else nothing is correct.")
    step_aware: StepAwareConfig | None = Field(
        None, description="Step-GRPO's step-aware relative reward; the accuracy term's weight is the paper's alpha.")
    workers: int = Field(2, ge=1, description="Reward processes.")
    timeout_s: float = Field(5.0, gt=0, description="Per-completion scoring limit; over it scores 0.")
    max_chars: int | None = Field(
        None, ge=1, description="Completions longer than this score 0 without being scored; None: derived "
                                "from rollout.max_new_tokens.")

    @field_validator("terms")
    @classmethod
    def _one_term_per_verifier(cls, terms: list[RewardTerm]) -> list[RewardTerm]:
        names = [t.verifier for t in terms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"each verifier may appear once; repeated: {', '.join(dupes)}")
        return terms

    @field_validator("accuracy")
    @classmethod
    def _accuracy_is_a_term(cls, accuracy: str | None, info: ValidationInfo) -> str | None:
        if "terms" not in info.data:  # the terms are invalid, and reported
            return accuracy
        names = [t.verifier for t in info.data["terms"]]
        if accuracy is None:
            return next((n for n in names if n in ACCURACY_VERIFIERS), None)
        if accuracy not in names:
            raise ValueError(f"{clip(accuracy)!r} is not the verifier of a term; the terms' verifiers are "
                             f"{', '.join(names)}")
        return accuracy

    @model_validator(mode="after")
    def _step_aware_needs_accuracy(self):
        if self.step_aware is not None and self.accuracy is None:
            raise ValueError("step_aware scales the accuracy term of correct completions: add a gsm8k_accuracy or "
                             "boxed_accuracy term (or name one in `accuracy`)")
        return self


class AllCompletions(Strict):
    method: Literal["all"] = Field("all", description="GRPO: train every completion with weight 1.")


class CPPOCompletions(Strict):
    method: Literal["cppo"] = "cppo"
    rate: float = Field(0.875, gt=0, lt=1, description="P: fraction of completions pruned by smallest |advantage|.")
    rule: Literal["batch", "group"] = Field(
        "batch", description="`batch`: drop the floor(P*N) smallest |A| of the step (the authors' code); "
                             "`group`: keep floor(G*(1-P)) largest |A| per prompt (the paper).")
    allocation: bool = Field(
        False, description="Dynamic completion allocation: draw prompts_per_step / (1-P) prompts per step, "
                           "so the learner still trains prompts_per_step * G completions.")


class DPPOCompletions(Strict):
    method: Literal["dppo"] = "dppo"
    rate: float = Field(0.3, ge=0, lt=1, description="Expected fraction of each group's completions pruned.")
    max_prob: float = Field(0.9, gt=0, lt=1, description="Cap on any completion's prune probability.")
    deterministic: bool = Field(False, description="Prune the lowest-|A| fraction exactly (biased; for comparison).")


class NoPromptPruning(Strict):
    method: Literal["none"] = Field("none", description="Generate for every drawn prompt.")


class DPPOPrompts(Strict):
    method: Literal["dppo"] = "dppo"
    rate: float = Field(0.3, ge=0, lt=1, description="Expected fraction of previously seen prompts pruned.")
    max_prob: float = Field(0.9, gt=0, lt=1, description="Cap on any prompt's prune probability.")
    history_decay: float = Field(0.5, ge=0, lt=1, description="EMA weight of a prompt's past reward-std score.")
    deterministic: bool = Field(False, description="Prune the lowest-score fraction exactly (biased; for comparison).")


class SelectionConfig(Strict):
    prompts: Annotated[NoPromptPruning | DPPOPrompts, Field(discriminator="method")] = NoPromptPruning()
    completions: Annotated[AllCompletions | CPPOCompletions | DPPOCompletions,
                           Field(discriminator="method")] = AllCompletions()

    @model_validator(mode="after")
    def _rates_under_cap(self):
        for level in (self.prompts, self.completions):
            if level.method == "dppo" and level.rate > level.max_prob:
                raise ValueError(f"dppo rate ({level.rate}) must not exceed max_prob ({level.max_prob})")
        return self


class PackingConfig(Strict):
    mode: Literal["padded", "dense"] = Field(
        "padded", description="`padded`: longest-first micro-batches padded to their longest row; "
                              "`dense`: Dense Prompt Packing, sequences concatenated padding-free.")
    window: int = Field(16, ge=1, description="`dense`: look-ahead window of the greedy fill.")


# `algorithm` is a preset over the axes; whatever a recipe sets in `selection`/`packing` wins.
ALGORITHM_PRESETS: dict[str, dict] = {
    "grpo": {"selection": {"prompts": {"method": "none"}, "completions": {"method": "all"}},
             "packing": {"mode": "padded"}},
    "cppo": {"selection": {"prompts": {"method": "none"}, "completions": {"method": "cppo"}},
             "packing": {"mode": "padded"}},
    "dppo": {"selection": {"prompts": {"method": "dppo"}, "completions": {"method": "dppo"}},
             "packing": {"mode": "dense"}},
}


def _apply_preset(preset: dict, given):
    """Recipe values over preset values; a level whose `method` the recipe changes drops the preset's."""
    if not isinstance(given, dict):
        return preset if given is None else given
    if "method" in given and given["method"] != preset.get("method"):
        return given
    return {**preset, **{k: _apply_preset(preset[k], v) if k in preset else v for k, v in given.items()}}


class CheckpointConfig(Strict):
    every_steps: int = Field(50, ge=1)
    keep_last: int = Field(2, ge=1)


class RLStage(StageBase):
    kind: Literal["rl"] = "rl"
    algorithm: Literal["grpo", "cppo", "dppo"] = Field(
        "grpo", description="Preset over the selection and packing axes (see ALGORITHM_PRESETS); "
                            "values set under `selection`/`packing` override it.")
    steps: int | None = Field(
        None, ge=1, description="RL steps; None: one pass over the train split (prompts drawn per step "
                                "include CPPO's allocation).")
    prompts_per_step: int = Field(8, ge=1)
    group_size: int = Field(8, ge=2, description="G: completions per prompt.")
    step_triggers: list[str] = Field(
        ["Wait"], min_length=1, description="Words that start a reasoning step (Step-GRPO): truncated rollouts "
                                            "probe at them, the step-aware reward counts them (standalone words).")
    persist_rollouts: int = Field(
        4, ge=0, description="Completions per step (one per prompt, first prompts first) saved with their prompts "
                             "to `<stage>/rollouts.jsonl`: calibration data for later compression stages.")
    advantage: AdvantageConfig = AdvantageConfig()
    selection: SelectionConfig = Field(
        SelectionConfig(), description="Which prompts are generated and which completions trained; "
                                       "defaults come from `algorithm` (grpo: all, cppo: cppo, dppo: dppo at both levels).")
    packing: PackingConfig = Field(
        PackingConfig(), description="How trained rows fill micro-batches; defaults come from `algorithm` (dppo: dense).")
    loss: LossConfig = LossConfig()
    rollout: RolloutConfig = RolloutConfig()
    learner: LearnerConfig = LearnerConfig()
    rewards: RewardConfig = RewardConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    def workers(self) -> list[WorkerDemand]:
        path, learner, rollout = f"stages.{self.name}", self.learner, self.rollout
        return [WorkerDemand("learner", f"{path}.learner", learner.ranks, learner.num_cpus_per_rank,
                             learner.num_gpus_per_rank),
                WorkerDemand("rollout", f"{path}.rollout", rollout.engines, rollout.num_cpus_per_engine,
                             rollout.num_gpus_per_engine)]

    @model_validator(mode="before")
    @classmethod
    def _algorithm_preset(cls, data):
        if isinstance(data, dict) and data.get("algorithm", "grpo") in ALGORITHM_PRESETS:
            preset = ALGORITHM_PRESETS[data.get("algorithm", "grpo")]
            data = {**data, **{axis: _apply_preset(value, data.get(axis)) for axis, value in preset.items()}}
        return data

    @model_validator(mode="after")
    def _axes_fit_together(self):
        c = self.selection.completions
        if c.method == "cppo":
            kept = self.group_size * (1 - c.rate)
            if c.rule == "group" and (kept < 1 or abs(kept - round(kept)) > 1e-6):
                raise ValueError(
                    f"selection.completions: rule 'group' keeps G*(1-P) = {self.group_size}*{1 - c.rate:g} = "
                    f"{kept:g} completions per prompt; choose P so that it is a whole number >= 1")
            drawn = self.prompts_per_step / (1 - c.rate)
            if c.allocation and abs(drawn - round(drawn)) > 1e-6:
                raise ValueError(
                    f"selection.completions: allocation draws prompts_per_step/(1-P) = {self.prompts_per_step}/"
                    f"{1 - c.rate:g} = {drawn:g} prompts per step; choose P or prompts_per_step so that it is whole")
        if self.loss.agg == "bnpo" and "dppo" in (c.method, self.selection.prompts.method):
            raise ValueError("loss.agg: 'bnpo' normalises each micro-batch by its own tokens, so DPPO's 1/(1-p) "
                             "reweighting is not unbiased under it; use grpo, dr_grpo or dapo")
        if self.rollout.async_ and "mode" not in self.loss.mismatch.model_fields_set:
            # Off-policy samples: correct with the engine's log-probs unless the recipe says otherwise.
            self.loss.mismatch = self.loss.mismatch.model_copy(update={"mode": "tis"})
        if self.rollout.top_p < 1 and self.loss.mismatch.mode != "none":
            raise ValueError("rollout.top_p < 1 with loss.mismatch: vLLM's log-probs are renormalised over the "
                             "nucleus while the learner scores the full softmax, so the mismatch weights would "
                             "be biased; set top_p: 1.0 or mismatch.mode: none")
        return self


from compress.distill.config import DistillStage  # noqa: E402  (stage configs import launch.schema_base only)
from compress.quantize.config import QuantizeStage  # noqa: E402
from compress.sparsify.config import SparsifyStage  # noqa: E402
from evaluation.config import EvalStage  # noqa: E402

STAGE_KINDS: dict[str, StageKind] = {
    "rl": StageKind(RLStage, "rl.controller:run_rl_stage"),
    "sparsify": StageKind(SparsifyStage, "compress.sparsify.stage:run_sparsify_stage"),
    "quantize": StageKind(QuantizeStage, "compress.quantize.stage:run_quantize_stage"),
    "distill": StageKind(DistillStage, "compress.distill.stage:run_distill_stage"),
    "eval": StageKind(EvalStage, "evaluation.stage:run_eval_stage"),
}
STAGE_TYPES: tuple[type[StageBase], ...] = tuple(kind.config for kind in STAGE_KINDS.values())
Stage = Annotated[Union[STAGE_TYPES], Field(discriminator="kind")]  # noqa: UP007 - a union built from the registry


# ---------------------------------------------------------------- the recipe

class Recipe(Strict):
    name: RecipeName = Field(
        description=f"Runs are created as `<run_root>/<name>-<timestamp>`: letters, digits, `_`, `.`, `-`, "
                    f"(not first), at most {NAME_MAX_LENGTH}.")
    seed: int = Field(
        42, ge=0, lt=SEED_LIMIT, description="Seeds sampling, prompt order, selection and the learner; workers "
                                             "add offsets to it, hence the bound.")
    model: ModelConfig
    data: DataConfig
    stages: list[Stage] = Field(min_length=1)
    cluster: ClusterConfig = ClusterConfig()
    logging: LoggingConfig = LoggingConfig()

    @field_validator("stages")
    @classmethod
    def _graph_is_valid(cls, stages: list):
        problems = stage_graph_problems(stages)
        if problems:
            # One error for pydantic; `problems` in its context keeps one (path, message) per
            # problem so that `launch.config` can report each on its own line.
            raise PydanticCustomError(
                "stage_graph", "{summary}",
                {"summary": "; ".join(f"{path}: {msg}" for path, msg in problems),
                 "problems": [list(p) for p in problems]})
        return stages


    @model_validator(mode="after")
    def _eval_accuracy_from_rewards(self):
        """An eval stage judges answers like the recipe's RL stage unless it names its own verifier."""
        rl = next((s for s in self.stages if s.kind == "rl"), None)
        judged_by = rl.rewards.accuracy if rl is not None else None
        default = judged_by if judged_by in ACCURACY_VERIFIERS else "gsm8k_accuracy"
        for stage in self.stages:
            if stage.kind == "eval" and stage.accuracy is None:
                stage.accuracy = default
        return self


def stage_graph_problems(stages: list) -> list[tuple[str, str]]:
    """(field path, message) for each problem of the job graph: duplicate names, unknown or
    self-referencing `needs`, cycles. An empty list means the graph can run."""
    names = [s.name for s in stages]
    problems = []
    for name in dict.fromkeys(n for n in names if names.count(n) > 1):
        where = [str(i) for i, n in enumerate(names) if n == name]
        problems.append((f"stages.{name}.name", f"duplicate stage name (stages {' and '.join(where)})"))
    for s in stages:
        for dep in s.needs:
            if dep == s.name:
                problems.append((f"stages.{s.name}.needs", "a stage cannot need itself"))
            elif dep not in names:
                problems.append((f"stages.{s.name}.needs",
                                 f"unknown stage {clip(dep)!r}; the stages are {clip(', '.join(names), 200)}"))
    if not problems:
        from launch.graph import topological_order  # cycle check lives with the runner
        try:
            topological_order({s.name: s.needs for s in stages})
        except ValueError as e:
            problems.append(("stages", str(e)))
    return problems
