"""The RL stage: one controller that reads like single-process code.

draw -> prune prompts -> generate -> score -> advantages (full group) -> select completions ->
pack -> train -> sync -> log. With `rollout.async`, step t+1's generation is submitted before
step t trains (see rl/rollouts.py).
The distribution lives behind RolloutGroup (vLLM engines) and LearnerGroup (DeepSpeed ranks).
"""
from __future__ import annotations

import time
from contextlib import ExitStack

import torch

from rewards import RewardPool, max_chars_for
from rl.advantages import group_advantages
from rl.batching import dense_microbatches, padding_fraction, split_across_ranks, token_budget_microbatches
from rl.checkpoint import CheckpointManager
from rl.data import PromptSampler, load_problems
from rl.fileio import append_jsonl
from rl.learner import LossNormaliser
from rl.learner_group import LearnerGroup
from rl.liveness import check_stop
from rl.rollouts import RolloutScheduler
from rl.rows import TrainingRow
from rl.selection import Selector
from rl.tracking import Timers, Tracker, drop_records_after
from rl.step_reward import count_steps, efficiency_factors, step_aware_rewards
from rollout.truncation import EXIT_REASONS, Truncation
from rollout.weight_sync import WeightSync
from rollout.worker import EngineSpec, RolloutGroup, Sampling

# Room in the engines' context for a probe's appended text (rollout.truncation.probe_text).
PROBE_TEXT_TOKENS = 32


def run_rl_stage(ctx) -> dict:
    recipe, cfg = ctx.recipe, ctx.stage
    ckpts = CheckpointManager(ctx.run_dir / "checkpoints" / cfg.name, cfg.checkpoint.keep_last)
    timers, one_step_off = Timers(), cfg.rollout.async_

    with ExitStack() as cleanup:
        resume_from = ckpts.latest() if ctx.resume else None
        state = ckpts.state(resume_from) if resume_from is not None else {"step": 0}
        start_step = state["step"]
        # Engines, the reward pool and the learners start together; the engines take longest.
        engines = RolloutGroup(engine_spec(recipe, recipe.data.max_prompt_tokens + cfg.rollout.max_new_tokens, recipe.seed,
                                           str(resume_from / "hf") if resume_from else recipe.model.path, cfg.rollout),
                               cfg.rollout.engines, recipe.cluster.liveness, max_replacements=recipe.cluster.max_restarts,
                               placed=lambda i: ctx.placement.options("rollout", i))
        cleanup.callback(engines.shutdown)
        reward_pool = cleanup.enter_context(
            RewardPool([t.model_dump() for t in cfg.rewards.terms], cfg.rewards.workers, cfg.rewards.timeout_s,
                       max_chars=cfg.rewards.max_chars or max_chars_for(cfg.rollout.max_new_tokens),
                       accuracy=cfg.rewards.accuracy))
        prompts, references = load_problems(recipe, "train")
        selector = Selector(cfg.selection, cfg.group_size, recipe.seed)
        drawn = selector.prompts_per_step(cfg.prompts_per_step)  # CPPO's allocation draws more
        total_steps = cfg.steps or max(1, len(prompts) // drawn)
        sampler = PromptSampler(len(prompts), recipe.seed)
        learners = LearnerGroup(recipe.model, cfg, total_steps * cfg.loss.iterations, recipe.seed,
                                recipe.cluster.liveness, placed=lambda r: ctx.placement.options("learner", r))
        cleanup.callback(learners.shutdown)
        if resume_from is not None:
            sampler.load_state_dict(state["sampler"])
            selector.load_state_dict(state.get("selection", {}))
            learners.call("load_checkpoint", str(resume_from / "deepspeed"), "state")
            print(f"[{cfg.name}] resumed from {resume_from} (step {start_step})", flush=True)
        tracker = Tracker(ctx.run_dir, recipe, cfg.name, total_steps, start_step, recipe.logging.progress)
        cleanup.callback(tracker.close)
        engines.wait_ready()
        weights = WeightSync(cfg.rollout.weight_sync, learners, engines, ctx.stage_dir / "weights")
        cleanup.callback(weights.close)
        rollouts = RolloutScheduler(engines, sampler, selector, prompts, drawn, train_sampling(cfg),
                                    cfg.rollout.max_staleness, recipe.seed, policy_version=start_step)
        batch_log = ctx.stage_dir / "batches.jsonl"  # which prompts each step drew: the data order
        samples = ctx.stage_dir / "rollouts.jsonl"  # calibration data for later compression stages
        for log in (batch_log, samples):
            drop_records_after(log, cfg.name, start_step)
        G = cfg.group_size

        for step in range(start_step + 1, total_steps + 1):
            check_stop()
            with timers("step"):
                with timers("rollout"):  # one-step-off: only the part of generation training did not hide
                    r, groups = rollouts.take(step)
                completions = [c for group in groups for c in group]
                with timers("reward"):
                    scored = reward_pool.score([c["text"] for c in completions],
                                               [references[i] for i in r.generated for _ in range(G)])
                rewards, steps = shaped_rewards(scored, completions, cfg)
                advantages = group_advantages(rewards, G, cfg.advantage.scale, cfg.advantage.eps)
                selector.record(r.generated, rewards)
                if one_step_off:
                    with timers("weight_sync"):  # logged every step: 0 when no push is due
                        if step < total_steps and rollouts.needs_weights(learner_version=step - 1):
                            push_weights(weights, rollouts, step - 1)
                    if step < total_steps:
                        rollouts.submit(step + 1)  # generates while the learners train on this step
                rows = [training_row(prompts[r.generated[j // G]], c, advantages[j].item(), cfg.loss)
                        for j, c in enumerate(completions)]
                train_rows, chosen = selector.completions(step, rows, r.prompt_weights, len(r.batch))
                with timers("pack"):
                    per_rank, norm, pad_frac = plan_microbatches(train_rows, chosen.num_seqs, chosen.num_tokens,
                                                                 cfg.learner, cfg.packing)
                with timers("train"):
                    stats = learners.call("train", per_rank_args=[(mbs, norm) for mbs in per_rank])
                if not one_step_off:
                    with timers("weight_sync"):
                        push_weights(weights, rollouts, step)
            tracker.log(step, {**step_metrics(scored, completions, train_rows, len(r.batch) * G,
                                              len(r.batch) - len(r.kept), stats, pad_frac, timers.pop()),
                               **reasoning_metrics(completions, steps, scored.correct),
                               "rollout/staleness": step - 1 - r.policy_version})
            append_jsonl(batch_log, {"stage": cfg.name, "step": step, "prompts": r.batch, "generated": r.generated})
            for i, group in enumerate(groups[:cfg.persist_rollouts]):
                append_jsonl(samples, {"stage": cfg.name, "step": step, "prompt_ids": prompts[r.generated[i]],
                                       "completion_ids": group[0]["token_ids"], "correct": scored.correct[i * G]})
            if step % cfg.checkpoint.every_steps == 0 or step == total_steps:
                with timers("checkpoint"):
                    save_checkpoint(ckpts, learners, step, {"sampler": r.sampler_state,
                                                            "selection": selector.state_dict()}, recipe.model.path)

        final = ctx.stage_dir / "model"
        learners.call("save_hf", str(final), recipe.model.path)
    return {"model": str(final), "steps": total_steps, "rollouts": str(samples) if samples.exists() else None}


def push_weights(weights: WeightSync, rollouts: RolloutScheduler, version: int) -> None:
    weights.push(version)
    rollouts.policy_version = version


def engine_spec(recipe, max_model_len: int, seed: int, model_path: str, rollout_cfg) -> EngineSpec:
    """Truncated rollouts call the engine several times per sample (prefix caching pays) and a
    probe decodes past the thinking it was appended to (room for its text and tokens)."""
    truncation = rollout_cfg.truncation
    truncated = truncation.enabled
    return EngineSpec(model_path, recipe.model.dtype,
                      max_model_len + (truncation.probe_tokens + PROBE_TEXT_TOKENS if truncated else 0), seed,
                      rollout_cfg.num_cpus_per_engine, rollout_cfg.num_gpus_per_engine, rollout_cfg.cpu_kvcache_gib,
                      rollout_cfg.enforce_eager, rollout_cfg.gpu_memory_utilization, recipe.model.trust_remote_code,
                      prefix_caching=truncated)


def train_sampling(cfg) -> Sampling:
    r, t = cfg.rollout, cfg.rollout.truncation
    truncation = Truncation(triggers=tuple(cfg.step_triggers), **t.model_dump(exclude={"enabled"})) if t.enabled else None
    return Sampling(cfg.group_size, r.temperature, r.top_p, r.max_new_tokens, truncation)


def shaped_rewards(scored, completions: list[dict], cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards after group-level shaping (Step-GRPO's step-aware reward, when set), and the steps
    of each completion."""
    rewards = torch.tensor(scored.total)
    steps = torch.tensor([count_steps(c["text"], cfg.step_triggers) for c in completions])
    shaping = cfg.rewards.step_aware
    if shaping is not None:
        accuracy = cfg.rewards.accuracy
        weight = next(t.weight for t in cfg.rewards.terms if t.verifier == accuracy)
        factors = efficiency_factors(steps, torch.tensor(scored.correct), cfg.group_size, shaping.beta,
                                     shaping.mu_over)
        rewards = step_aware_rewards(rewards, torch.tensor(scored.per_verifier[accuracy]), weight, factors)
    return rewards, steps


def training_row(prompt_ids, completion, advantage, loss_cfg) -> TrainingRow:
    return TrainingRow(prompt_ids, completion["token_ids"], completion["logprobs"], advantage,
                       masked=loss_cfg.mask_truncated and completion["finish_reason"] == "length",
                       inserted=completion.get("inserted"), train_inserted=loss_cfg.train_inserted)


def plan_microbatches(rows: list[TrainingRow], num_seqs: float, num_tokens: float, learner_cfg, packing_cfg):
    """Token-budget micro-batches (padded, or densely packed) split evenly over ranks, with the
    loss normaliser (selection's counts) and the padding fraction."""
    lengths = [r.length for r in rows]
    packed = packing_cfg.mode == "dense"
    if packed:
        batches = dense_microbatches(lengths, learner_cfg.max_tokens_per_microbatch, packing_cfg.window)
    else:
        batches = token_budget_microbatches(lengths, learner_cfg.max_tokens_per_microbatch)
    per_rank = split_across_ranks(batches, lengths, learner_cfg.ranks)
    norm = LossNormaliser(num_seqs=max(num_seqs, 1e-9), num_tokens=max(num_tokens, 1.0), num_microbatches=len(batches))
    return ([[[rows[i] for i in mb] for mb in mbs] for mbs in per_rank], norm,
            padding_fraction(lengths, batches, packed=packed))


def step_metrics(scored, completions, train_rows, full_batch, prompts_skipped, stats, pad_frac, timing) -> dict[str, float]:
    total = lambda key: sum(s[key] for s in stats)  # noqa: E731 - summed over ranks
    tokens = max(1.0, total("tokens"))
    rewards = torch.tensor(scored.total)
    lengths = torch.tensor([len(c["token_ids"]) for c in completions], dtype=torch.float32)
    kept_tokens = sum(len(r.completion_ids) for r in train_rows)
    metrics = {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item() if len(rewards) > 1 else 0.0,
        "reward/accuracy": sum(scored.correct) / len(scored.correct),
        **{f"reward/{name}": sum(v) / len(v) for name, v in scored.per_verifier.items()},
        "reward/timeouts": scored.timeouts, "reward/errors": scored.errors, "reward/rejected": scored.rejected,
        "response/length_mean": lengths.mean().item(),
        "response/truncated_frac": sum(c["finish_reason"] == "length" for c in completions) / len(completions),
        "rollout/tokens": lengths.sum().item(),
        "loss/total": total("loss"),
        "loss/policy": total("policy_loss"),
        "loss/kl": total("kl") / tokens,
        "train/clip_frac": total("clipped") / tokens,
        "train/entropy": total("entropy") / tokens,
        "train/grad_norm": stats[0]["grad_norm"],
        "train/lr": stats[0]["lr"],
        "train/tokens": tokens,
        "train/rows": len(train_rows),
        "select/kept_frac": len(train_rows) / full_batch,
        "select/tokens_saved": 1.0 - kept_tokens / max(1.0, lengths.sum().item()),
        "select/prompts_skipped": prompts_skipped,
        "pack/padding_frac": pad_frac,
        "rollout/mismatch_kl": total("mismatch_kl") / tokens,
        "rollout/is_weight_mean": total("is_weight_mean") / tokens,
        **timing,
    }
    metrics["perf/tokens_per_s"] = lengths.sum().item() / max(timing["timing/step"], 1e-9)
    return metrics


def reasoning_metrics(completions: list[dict], steps: torch.Tensor, correct: list[bool]) -> dict[str, float]:
    """Steps and tokens per correct answer; with truncated rollouts, how each one ended."""
    ok = torch.tensor(correct, dtype=torch.bool)
    lengths = torch.tensor([len(c["token_ids"]) for c in completions], dtype=torch.float32)
    metrics = {"response/steps_mean": steps.float().mean().item()}
    if ok.any():
        metrics["response/steps_per_correct"] = steps[ok].float().mean().item()
        metrics["response/tokens_per_correct"] = lengths[ok].mean().item()
    if "exit" not in completions[0]:
        return metrics
    for reason in EXIT_REASONS:
        metrics[f"rollout/exit_{reason}"] = sum(c["exit"] == reason for c in completions) / len(completions)
    metrics["rollout/probes_mean"] = sum(c["probes"] for c in completions) / len(completions)
    metrics["rollout/inserted_frac"] = sum(map(sum, (c["inserted"] for c in completions))) / max(1, lengths.sum().item())
    confidences = torch.tensor([x for c in completions for x in c["confidences"]])
    if len(confidences):
        for q in (0.1, 0.5, 0.9):
            metrics[f"rollout/confidence_p{int(q * 100)}"] = confidences.quantile(q).item()
    return metrics


def save_checkpoint(ckpts: CheckpointManager, learners: LearnerGroup, step: int, state: dict, tokenizer_path) -> None:
    partial = ckpts.begin(step)
    learners.call("save_checkpoint", str(partial / "deepspeed"), "state")
    learners.call("save_hf", str(partial / "hf"), tokenizer_path)
    ckpts.commit(partial, {"step": step, **state, "time": time.time()})
    print(f"[checkpoint] step {step} -> {partial.with_suffix('')}", flush=True)
