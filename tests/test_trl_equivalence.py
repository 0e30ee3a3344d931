"""Our token_loss + aggregate against TRL 1.16.0's own GRPOTrainer._compute_loss.

A real GRPOTrainer is built around a tiny random Qwen2; TRL's _compute_loss runs its own forward
pass on a batch we construct. We compute the same model's logprobs with a plain forward and feed
them, with the identical old/ref logprobs, advantages and masks, to our functions. Losses and
parameter gradients must agree. One micro-batch on one rank: num_seqs = B, num_tokens =
mask.sum(), num_microbatches = 1.
"""
import pytest
import torch

trl = pytest.importorskip("trl")
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from rl.aggregation import aggregate  # noqa: E402
from rl.mismatch import mismatch_weights  # noqa: E402
from rl.policy_loss import token_loss  # noqa: E402

assert trl.__version__ == "1.16.0", "the equivalence is pinned to TRL 1.16.0"

VOCAB = 32
B, P, T = 4, 3, 6
MAX_COMPLETION = 8  # > T, so dr_grpo's divisor is the configured length, not the padded width
EPS_LOW, EPS_HIGH = 0.2, 0.28
MODES = ["grpo", "bnpo", "dr_grpo", "dapo"]
IS_RANGE = (0.5, 1.5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Qwen2 saved to disk: with β > 0 TRL builds its reference model from the path."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=1)
    path = tmp_path_factory.mktemp("tiny-qwen2")
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


def _tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(VOCAB - 2)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _trainer(model_dir, loss_type, beta, *, is_mode=None):
    args = GRPOConfig(
        output_dir=str(model_dir / "out"), use_cpu=True, bf16=False, fp16=False, report_to="none",
        per_device_train_batch_size=B, num_generations=B, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, max_completion_length=MAX_COMPLETION,
        temperature=1.0, disable_dropout=True, cast_lm_head_to_fp32=False,
        loss_type=loss_type, beta=beta, epsilon=EPS_LOW, epsilon_high=EPS_HIGH, delta=None,
        importance_sampling_level="token", use_bias_correction_kl=False,
        top_entropy_quantile=1.0, entropy_coef=0.0, use_adaptive_entropy=False,
        off_policy_mask_threshold=None, mask_truncated_completions=False, scale_rewards="group",
        use_vllm=False, vllm_importance_sampling_correction=is_mode is not None,
        vllm_importance_sampling_mode=is_mode or "sequence_mask",
        # Read only where TRL computes the ratio itself (generation); we pass ours, same range.
        vllm_importance_sampling_clip_min=IS_RANGE[0], vllm_importance_sampling_clip_max=IS_RANGE[1],
    )
    trainer = GRPOTrainer(
        model=Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
        train_dataset=Dataset.from_dict({"prompt": ["w1 w2 w3"] * B}), processing_class=_tokenizer(),
    )
    # Set by Trainer's training loop (one micro-batch per optimizer step here); _compute_loss reads it.
    trainer.current_gradient_accumulation_steps = 1
    if is_mode is not None:
        # TRL applies inputs["importance_sampling_ratio"] only when use_vllm; we supply the ratio
        # ourselves, so switch on that branch without starting an engine.
        trainer.use_vllm = True
    trainer.model.train()
    return trainer


def _batch():
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(2, VOCAB, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_ids[1, 0], prompt_mask[1, 0] = 0, 0  # one left-padded prompt, as TRL lays them out
    completion_ids = torch.randint(2, VOCAB, (B, T), generator=g)
    lengths = torch.tensor([6, 2, 4, 5])
    completion_mask = (torch.arange(T) < lengths[:, None]).long()
    completion_ids[completion_mask == 0] = 0
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, advantages=torch.randn(B, generator=g))


def _logps(model, batch):
    """Per-token logprobs of the completion under `model`, by a plain forward pass."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, P - 1:-1]
    return logits.log_softmax(-1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _compare(trainer, inputs, *, kl_coef, is_weights=None):
    """Run TRL's and our loss on the same model; return (trl_loss, our_loss, stats)."""
    model = trainer.model
    model.zero_grad()
    trl_loss = trainer._compute_loss(model, inputs)
    trl_loss.backward()
    trl_grads = _grads(model)

    model.zero_grad()
    logp = _logps(model, inputs)
    mask = inputs["completion_mask"]
    old = inputs.get("old_per_token_logps", logp.detach())
    per_token, stats = token_loss(
        logp, old, inputs["advantages"], mask, eps_low=EPS_LOW, eps_high=EPS_HIGH,
        kl_coef=kl_coef, ref_logp=inputs.get("ref_per_token_logps"), is_weights=is_weights,
    )
    ours = aggregate(per_token, mask, trainer.loss_type, num_seqs=B, num_tokens=int(mask.sum()),
                     max_new_tokens=MAX_COMPLETION, num_microbatches=1)
    ours.backward()
    our_grads = _grads(model)

    torch.testing.assert_close(ours, trl_loss, rtol=1e-5, atol=1e-6)
    assert len(our_grads) == len(trl_grads) > 0
    for a, b in zip(our_grads, trl_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    return stats


def _off_policy_inputs(trainer, *, with_ref):
    """A batch whose old (and ref) logprobs are perturbed so ratios leave the clip range."""
    batch = _batch()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        logp = _logps(trainer.model, batch)
    batch["old_per_token_logps"] = logp + 0.5 * torch.randn(B, T, generator=g)
    if with_ref:
        batch["ref_per_token_logps"] = logp + 0.3 * torch.randn(B, T, generator=g)
    batch["num_items_in_batch"] = batch["completion_mask"].sum()
    return batch


@pytest.mark.parametrize("mode", MODES)
def test_on_policy_matches_trl(model_dir, mode):
    trainer = _trainer(model_dir, mode, beta=0.0)
    inputs = _batch()  # no old logps: TRL uses per_token_logps.detach(), as we do with μ = 1
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    _compare(trainer, inputs, kl_coef=0.0)


@pytest.mark.parametrize("mode", MODES)
def test_clip_active_matches_trl(model_dir, mode):
    trainer = _trainer(model_dir, mode, beta=0.0)
    stats = _compare(trainer, _off_policy_inputs(trainer, with_ref=False), kl_coef=0.0)
    mask = _batch()["completion_mask"].bool()
    assert stats["clipped"][mask].any(), "the test must exercise the clipped branch"
    ratio = stats["ratio"][mask]
    assert (ratio < 1 - EPS_LOW).any() and (ratio > 1 + EPS_HIGH).any()


@pytest.mark.parametrize("mode", MODES)
def test_kl_and_clip_match_trl(model_dir, mode):
    trainer = _trainer(model_dir, mode, beta=0.04)
    stats = _compare(trainer, _off_policy_inputs(trainer, with_ref=True), kl_coef=0.04)
    assert stats["kl"].abs().sum() > 0


@pytest.mark.parametrize("is_mode, level, correction", [
    ("token_truncate", "token", "tis"),
    ("sequence_mask", "sequence", "mis"),
])
def test_importance_weights_apply_like_trl(model_dir, is_mode, level, correction):
    """Our weights fed to TRL as its vLLM IS ratio: same placement (policy term only, before β·KL)."""
    trainer = _trainer(model_dir, "dapo", beta=0.04, is_mode=is_mode)
    inputs = _off_policy_inputs(trainer, with_ref=True)
    mask = inputs["completion_mask"]
    g = torch.Generator().manual_seed(3)
    rollout = inputs["old_per_token_logps"] + 0.4 * torch.randn(B, T, generator=g)
    w, _ = mismatch_weights(inputs["old_per_token_logps"], rollout, mask,
                            mode=correction, level=level, c_min=IS_RANGE[0], c_max=IS_RANGE[1])
    assert (w[mask.bool()] != 1).any()
    # TRL keeps the sequence-level ratio as [B, 1]; ours is the same value broadcast to [B, T].
    inputs["importance_sampling_ratio"] = w[:, :1] if level == "sequence" else w
    _compare(trainer, inputs, kl_coef=0.04, is_weights=w)
