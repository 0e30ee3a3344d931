"""Real Ray + real vLLM (CPU) + real DeepSpeed (gloo) on the shipped tiny policy."""
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TINY_POLICY
from launch.schema import LivenessConfig, ModelConfig, RLStage
from rl.controller import plan_microbatches
from rl.learner_group import LearnerGroup
from rl.rows import TrainingRow
from rollout.worker import EngineSpec, RolloutGroup, Sampling

pytestmark = pytest.mark.slow
MODEL = ModelConfig(path=str(TINY_POLICY), dtype="float32")


def plan(rows: list[TrainingRow], cfg: RLStage):
    """Micro-batches for every row with weight 1 (GRPO's selection)."""
    return plan_microbatches(rows, len(rows), sum(r.loss_tokens for r in rows), cfg.learner, cfg.packing)


def stage_cfg(**learner) -> RLStage:
    cfg = RLStage(name="train", rollout={"max_new_tokens": 24})
    cfg.learner = cfg.learner.model_copy(update=learner)
    return cfg


def fixed_rows(tokenizer, n=12) -> list[TrainingRow]:
    """Rows of varied length with nonzero advantages, independent of any sampling."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        prompt = tokenizer(f"Question: Tom has {i + 2} apples and buys {i + 3} more.\nAnswer:")["input_ids"]
        completion = torch.randint(5, tokenizer.vocab_size, (3 + (i * 7) % 17,), generator=gen).tolist()
        rows.append(TrainingRow(prompt, completion, None, float(torch.randn(1, generator=gen))))
    return rows


def train_once(rows, cfg: RLStage) -> dict[str, torch.Tensor]:
    group = LearnerGroup(MODEL, cfg, total_optimizer_steps=1, seed=0, liveness=LivenessConfig())
    try:
        per_rank, norm, _ = plan(rows, cfg)
        stats = group.call("train", per_rank_args=[(mbs, norm) for mbs in per_rank])
        assert all(s["tokens"] >= 0 for s in stats)
        return group.call("full_state_dict")[0]
    finally:
        group.shutdown()


@pytest.mark.parametrize("agg,zero_stage,packing,offload", [("dapo", 2, "padded", False), ("grpo", 3, "dense", False),
                                                             ("dapo", 1, "padded", True)])
def test_update_independent_of_ranks_and_microbatching(ray_local, agg, zero_stage, packing, offload):
    """One rank with one padded micro-batch and two ZeRO ranks with tiny micro-batches (plus
    zero-weight pads; padded or densely packed; the optimizer offloaded or not) must take the same
    optimizer step: the loss shares sum to the same batch loss, whatever the budget and layout."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_POLICY)
    rows = fixed_rows(tokenizer)
    base = stage_cfg(ranks=1, zero_stage=0, max_tokens_per_microbatch=100_000)
    base.loss.agg = agg
    split = stage_cfg(ranks=2, zero_stage=zero_stage, max_tokens_per_microbatch=48, offload_optimizer=offload)
    split.loss.agg, split.packing.mode = agg, packing
    for cfg in (base, split):
        # With a large Adam epsilon the first step is ~ -lr * grad, so equal updates mean equal
        # gradients (with eps=1e-8 it would be ~ -lr * sign(grad), which amplifies float noise).
        cfg.learner.optim.lr, cfg.learner.optim.eps, cfg.learner.optim.grad_clip = 1.0, 1.0, 0.0
    per_rank, _, _ = plan(rows, split)
    assert len(per_rank[0]) >= 3, "the split run should accumulate over several micro-batches"

    one = train_once(rows, base)
    two = train_once(rows, split)
    original = AutoModelForCausalLM.from_pretrained(TINY_POLICY).state_dict()
    moved = max((one[k] - original[k]).abs().max().item() for k in one)
    assert moved > 1e-4, "the step did not change the weights"
    for k in one:
        expected = one[k] - original[k]
        # Summation order differs (micro-batches, reduce-scatter), so float error scales with
        # the tensor's largest update; a normalisation bug would be off by whole factors.
        torch.testing.assert_close(two[k] - original[k], expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item(),
                                   msg=lambda m, k=k: f"{k}: update differs ({agg}): {m}")


def test_weight_sync_engine_matches_learner(ray_local, tmp_path):
    """After a training step and a sync, the vLLM engine's sampling log-probs (at temperature T)
    and greedy output equal transformers' with the learner's weights; and the learner scores the
    engine's samples under the same temperature (its mismatch KL to the engine is ~0)."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_POLICY)
    T = 0.7
    cfg = stage_cfg(ranks=2, zero_stage=3)
    cfg.learner.optim.lr, cfg.rollout.temperature = 1e-3, T
    prompts = [tokenizer(f"Question: Ann has {n} pens and gets {n + 4} more. How many pens does she have?\nAnswer:")
               ["input_ids"] for n in (3, 11, 25)]
    rollout = RolloutGroup(EngineSpec(str(TINY_POLICY), "float32", 256, seed=0), engines=1, liveness=LivenessConfig())
    learners = LearnerGroup(MODEL, cfg, total_optimizer_steps=1, seed=0, liveness=LivenessConfig())
    rollout.wait_ready()
    try:
        sampled = rollout.generate(prompts, Sampling(n=4, temperature=T, top_p=1.0, max_new_tokens=24))
        rows = [TrainingRow(p, c["token_ids"], c["logprobs"], 1.0 if k % 2 else -1.0)
                for p, group in zip(prompts, sampled) for k, c in enumerate(group)]
        assert all(len(c["logprobs"]) == len(c["token_ids"]) for g in sampled for c in g)
        per_rank, norm, _ = plan(rows, cfg)
        stats = learners.call("train", per_rank_args=[(mbs, norm) for mbs in per_rank])
        handle = learners.call("publish_weights", "file", str(tmp_path / "sync"), 1)[0]
        rollout.load_weights("file", handle, timeout_s=60)
        engine_out = [g[0]["token_ids"] for g in rollout.generate(prompts, Sampling(1, 0.0, 1.0, 24))]
        resampled = rollout.generate(prompts, Sampling(n=2, temperature=T, top_p=1.0, max_new_tokens=24))
        learners.call("save_hf", str(tmp_path / "hf"), str(TINY_POLICY))
    finally:
        rollout.shutdown()
        learners.shutdown()

    mismatch_kl = sum(s["mismatch_kl"] for s in stats) / sum(s["tokens"] for s in stats)
    assert abs(mismatch_kl) < 1e-5, mismatch_kl  # ~0.05 when the learner ignores the temperature
    synced = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    original_model = AutoModelForCausalLM.from_pretrained(TINY_POLICY).eval()
    original = original_model.state_dict()
    assert any((synced.state_dict()[k] - original[k]).abs().max() > 1e-4 for k in original)

    # The engine's sampling logprobs are the synced model's, and measurably not the old model's.
    def logprobs(model, prompt, completion):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float() / T, -1)
        return logp[len(prompt) - 1:].gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
    new_gap = old_gap = 0.0
    for prompt, group in zip(prompts, resampled):
        for c in group:
            engine_lp = torch.tensor(c["logprobs"])
            new_gap = max(new_gap, (engine_lp - logprobs(synced, prompt, c["token_ids"])).abs().max().item())
            old_gap = max(old_gap, (engine_lp - logprobs(original_model, prompt, c["token_ids"])).abs().max().item())
    assert new_gap < 1e-3 and old_gap > 10 * new_gap, (new_gap, old_gap)
    for prompt, got in zip(prompts, engine_out):
        ids = torch.tensor([prompt])
        out = synced.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id or 0)
        expected = out[0, len(prompt):].tolist()
        if tokenizer.eos_token_id in expected:
            expected = expected[:expected.index(tokenizer.eos_token_id) + 1]
        assert got == expected


def rewarded_answer_gains_likelihood(learner: dict, loss: dict | None = None) -> dict:
    """One GRPO step where the answer 8 has advantage +1.5 and 6, 7, 9 have -0.5 (a group's
    advantages sum to zero, so the shared tokens get no net push): afterwards 8 must be more
    likely and the others less (the sign and plumbing of the whole update)."""
    tok = AutoTokenizer.from_pretrained(TINY_POLICY)
    prompt = tok("Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:")["input_ids"]
    answers = {n: tok(f" Tom has 3 + 5 = {n} apples.\n#### {n}")["input_ids"] + [tok.eos_token_id]
               for n in (6, 7, 8, 9)}
    cfg = RLStage(name="train", learner=learner, loss=loss or {})
    cfg.learner.optim.lr = 1e-4
    rows = [TrainingRow(prompt, ids, None, 1.5 if n == 8 else -0.5) for n, ids in answers.items()]
    group = LearnerGroup(MODEL, cfg, total_optimizer_steps=1, seed=0, liveness=LivenessConfig())
    try:
        per_rank, norm, _ = plan(rows, cfg)
        stats = group.call("train", per_rank_args=[(mbs, norm) for mbs in per_rank])
        state = group.call("full_state_dict")[0]
    finally:
        group.shutdown()
    model = AutoModelForCausalLM.from_pretrained(TINY_POLICY).eval()

    def seq_logp(ids):
        full = torch.tensor([prompt + ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(full).logits[0, :-1], -1)
        return logp[len(prompt) - 1:].gather(-1, torch.tensor(ids)[:, None]).sum().item()
    before = {n: seq_logp(ids) for n, ids in answers.items()}
    model.load_state_dict(state)
    after = {n: seq_logp(ids) for n, ids in answers.items()}
    assert after[8] > before[8], (before, after)
    for n in (6, 7, 9):
        assert after[n] < before[n], (n, before, after)
    return stats[0]


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_update_raises_likelihood_of_rewarded_completion(ray_local, zero_stage):
    stats = rewarded_answer_gains_likelihood({"ranks": 1, "zero_stage": zero_stage})
    assert stats["grad_norm"] > 0 and stats["kl"] == 0.0


def test_reference_kl_and_two_iterations(ray_local):
    """kl_coef > 0 loads a reference model; with mu = 2 the second pass is off-policy, so the
    k3 KL to the reference is positive (it is exactly 0 on the first pass), and the total loss
    exceeds the policy term by the KL term."""
    stats = rewarded_answer_gains_likelihood({"ranks": 1}, {"kl_coef": 0.04, "iterations": 2})
    assert stats["kl"] > 0 and stats["grad_norm"] > 0
    assert stats["loss"] > stats["policy_loss"]


def test_tokens_without_engine_logprobs_get_mismatch_ratio_one(ray_local):
    """Rows without rollout log-probs under masked IS: their ratio must be 1 (kept), not
    exp(logπ_old − 0) ≈ 0 (masked out, which would leave no policy gradient at all)."""
    stats = rewarded_answer_gains_likelihood({"ranks": 1}, {"mismatch": {"mode": "mis", "c_min": 0.5}})
    assert stats["is_weight_mean"] == pytest.approx(stats["tokens"])  # summed per token: weight 1 each


def test_engines_that_miss_their_start_deadline_are_stopped(ray_local):
    """A group whose engines are not ready in time raises and stops them: the CPU an engine holds
    comes back (a stage restart would otherwise wait on it)."""
    from rl.liveness import WorkerFailure

    free_before = ray_local.available_resources().get("CPU", 0)
    with pytest.raises(WorkerFailure, match="starting rollout engines: no answer from rollout engine 0 within 0.5s"):
        RolloutGroup(EngineSpec(str(TINY_POLICY), "float32", 256, seed=0, num_cpus=1), engines=1,
                     liveness=LivenessConfig(startup_timeout_s=0.5)).wait_ready()
    deadline = time.time() + 20
    while ray_local.available_resources().get("CPU", 0) < free_before and time.time() < deadline:
        time.sleep(0.5)
    assert ray_local.available_resources().get("CPU", 0) == free_before
