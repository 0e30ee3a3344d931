"""The chunked log-prob head equals the full-logits form (values, entropy, gradients) on the tiny policy."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY_POLICY
from test_packing import varied_rows
from transformers import AutoModelForCausalLM

from rl.collate import collate
from rl.logprobs import completion_logprobs, direct_logprobs

ROWS = varied_rows(seed=2)
TOKENS = sum(len(r.completion_ids) for r in ROWS)  # 40 completion tokens reach the head


@pytest.fixture(scope="module")
def policy():
    return AutoModelForCausalLM.from_pretrained(TINY_POLICY, dtype=torch.float32).eval()


def run(fn, model, batch):
    model.zero_grad(set_to_none=True)
    logp, entropy = fn(model, batch)
    weights = batch.loss_mask * batch.advantages[:, None]
    (logp * weights).sum().backward()
    return logp.detach(), entropy, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_equals_direct(policy, packed, temperature):
    batch = collate(ROWS, 0, packed=packed)
    direct = run(lambda m, b: direct_logprobs(m, b, temperature, with_entropy=True), policy, batch)
    for chunk in (7, TOKENS, TOKENS + 9):  # smaller than, equal to, larger than the tokens
        chunked = run(lambda m, b: completion_logprobs(m, b, temperature, chunk, with_entropy=True), policy, batch)
        torch.testing.assert_close(chunked[0], direct[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(chunked[1], direct[1], atol=1e-5, rtol=1e-5)
        for name in direct[2]:
            torch.testing.assert_close(chunked[2][name], direct[2][name], atol=1e-5, rtol=1e-4,
                                       msg=lambda m, name=name: f"chunk {chunk}, {name}: {m}")
        assert not chunked[1].requires_grad, "entropy carries no gradient"


def test_temperature_and_padding(policy):
    batch = collate(ROWS, 0, packed=True)
    with torch.no_grad():
        hot, _ = completion_logprobs(policy, batch, 1.0, chunk_tokens=8)
        cold, _ = completion_logprobs(policy, batch, 0.5, chunk_tokens=8)
    mask = batch.completion_mask
    assert (hot[mask] < 0).all() and (hot[~mask] == 0).all() and (cold[~mask] == 0).all()
    assert (hot[mask] - cold[mask]).abs().min() > 0, "T divides the logits"
    # By hand at one token: log softmax(z / T) at the target, from the model's own logits.
    logits = policy(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0]
    z = logits[batch.predict_at[0, 0]] / 0.5
    torch.testing.assert_close(cold[0, 0], torch.log_softmax(z, -1)[batch.targets[0, 0]], atol=1e-5, rtol=1e-5)


def test_only_completion_tokens_reach_the_head_one_chunk_at_a_time(policy):
    batch = collate(ROWS, 0, packed=False)
    rows, calls = [], []
    head = policy.get_output_embeddings().register_forward_hook(
        lambda mod, inp, out: rows.append(out.shape[:-1].numel()))
    # DeepSpeed ZeRO-3 resets its fetch schedule in a pre-hook on the root module: it must run once a pass.
    root = policy.register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        with torch.no_grad():
            completion_logprobs(policy, batch, 1.0, chunk_tokens=16)
        assert rows == [0, 16, 16, TOKENS - 32], "the model's own head keeps no position; not the 6 x 22 padded"
        assert len(calls) == 1
        rows.clear()
        logp, _ = completion_logprobs(policy, batch, 1.0, chunk_tokens=16)
        assert rows == [0, 16, 16, TOKENS - 32]
        logp.sum().backward()
        assert sorted(rows[4:]) == [TOKENS - 32, 16, 16], "backward recomputes each chunk's logits, one at a time"
    finally:
        head.remove()
        root.remove()


def test_a_head_that_transforms_logits_is_refused(policy, monkeypatch):
    batch = collate(ROWS[:1], 0, packed=True)
    monkeypatch.setattr(policy.config, "final_logit_softcapping", 30.0, raising=False)
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        completion_logprobs(policy, batch, 1.0, chunk_tokens=8)
    with pytest.raises(ValueError):
        monkeypatch.setattr(policy.config, "final_logit_softcapping", None)
        completion_logprobs(policy, batch, 1.0, chunk_tokens=0)
