"""Dense Prompt Packing: window-greedy micro-batches by hand, collation layouts, packed == padded on the tiny policy."""
from __future__ import annotations

import random

import pytest
import torch
from conftest import TINY_POLICY
from transformers import AutoModelForCausalLM

from rl.batching import dense_microbatches, padding_fraction
from rl.varlen_attention import VARLEN
from rl.collate import ModelBatch, collate
from rl.logprobs import completion_logprobs
from rl.rows import TrainingRow

# ---------------------------------------------------------------- dense_microbatches


def sums(lengths, batches) -> list[int]:
    return [sum(lengths[i] for i in b) for b in batches]


def test_window_one_is_next_fit_in_order():
    lengths = [6, 5, 4, 3, 2]
    # Budget 10: 6, then 5 does not fit (4 left) -> emit [0]; 5+4 = 9, 3 does not fit -> emit [1, 2]; 3+2.
    assert dense_microbatches(lengths, 10, window=1) == [[0], [1, 2], [3, 4]]


def test_a_wider_window_packs_into_fewer_microbatches():
    lengths = [6, 5, 4, 3, 2]
    # Window 3, budget 10: window {6,5,4} -> take 6 (4 left); {5,4,3} -> the largest that fits is 4
    # (0 left); {5,3,2}: nothing fits -> emit [0, 2]. Then 5, 3 (2 left), 2 (0 left).
    batches = dense_microbatches(lengths, 10, window=3)
    assert batches == [[0, 2], [1, 3, 4]]
    assert sums(lengths, batches) == [10, 10]
    assert len(batches) < len(dense_microbatches(lengths, 10, window=1))


def test_the_window_is_the_next_items_not_yet_placed():
    lengths = [6, 5, 4, 3, 2]
    # Window 2: {6,5} -> 6 (4 left); {5,4} -> 4 (0 left); {5,3}: none -> emit [0, 2]; then
    # {5,3} -> 5 (5 left); {3,2} -> 3 (2 left); {2} -> 2.
    assert dense_microbatches(lengths, 10, window=2) == [[0, 2], [1, 3, 4]]
    # Window 2 cannot see the 3 next to the 7 (two 5s are in the way); a window of 4 can:
    assert dense_microbatches([7, 5, 5, 3], 10, window=2) == [[0], [1, 2], [3]]
    assert dense_microbatches([7, 5, 5, 3], 10, window=4) == [[0, 3], [1, 2]]


def test_ties_go_to_the_earliest():
    # Budget 8, window 3: {3,4,4} -> the first 4 (item 1); {3,4,1} -> 4 (item 2); 0 left -> emit.
    assert dense_microbatches([3, 4, 4, 1], 8, window=3) == [[1, 2], [0, 3]]


def test_items_over_the_budget_get_their_own_microbatch_and_no_window_slot():
    # 30 and 12 exceed 10: alone, first. They take no window slot, so window 1 still pairs 4 with 4.
    assert dense_microbatches([4, 30, 4, 12], 10, window=1) == [[1], [3], [0, 2]]
    assert dense_microbatches([11], 10, window=4) == [[0]]


def test_edge_cases():
    assert dense_microbatches([], 10, window=3) == []
    assert dense_microbatches([10, 10], 10, window=2) == [[0], [1]]  # exactly the budget fits
    with pytest.raises(ValueError):
        dense_microbatches([1], 10, window=0)


def next_fit(lengths, budget):
    batches, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if n > budget:
            batches.insert(sum(1 for b in batches if len(b) == 1 and lengths[b[0]] > budget), [i])
            continue
        if current and used + n > budget:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    return batches + ([current] if current else [])


@pytest.mark.parametrize("seed", range(20))
def test_dense_microbatch_properties(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 80))]
    budget = rng.choice([64, 256, 1000, 4096])
    for window in (1, 2, 8, len(lengths)):
        batches = dense_microbatches(lengths, budget, window)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths))), "every index exactly once"
        for b in batches:
            assert b, "no empty micro-batches"
            assert sum(lengths[i] for i in b) <= budget or (len(b) == 1 and lengths[b[0]] > budget)
    assert dense_microbatches(lengths, budget, 1) == next_fit(lengths, budget)
    # A window over every item closes a micro-batch only when no item placed later would fit in it.
    packed = [b for b in dense_microbatches(lengths, budget, len(lengths)) if sum(lengths[i] for i in b) <= budget]
    for k, b in enumerate(packed[:-1]):
        left = budget - sum(lengths[i] for i in b)
        assert left < min(lengths[i] for later in packed[k + 1:] for i in later)


def test_padding_fraction_of_packed_microbatches_is_zero():
    lengths = [4, 2, 3, 1]
    assert padding_fraction(lengths, [[0, 1], [2, 3]], packed=False) == pytest.approx(4 / 14)
    assert padding_fraction(lengths, [[0, 1], [2, 3]], packed=True) == 0.0


# ---------------------------------------------------------------- collation layouts

ROWS = [
    TrainingRow([11, 12, 13], [21, 22], [-0.5, -0.25], advantage=1.0, weight=2.0),
    TrainingRow([14], [23, 24, 25], None, advantage=-1.0),
    TrainingRow([15, 16], [26], [-1.5], advantage=0.5, masked=True),
]


def test_padded_layout_by_hand():
    b = collate(ROWS, pad_id=0, packed=False)
    assert b.input_ids.tolist() == [[11, 12, 13, 21, 22], [14, 23, 24, 25, 0], [15, 16, 26, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert b.position_ids[b.attention_mask.bool()].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]
    # Flat index into 3 x 5 positions of the state just before each completion token.
    assert b.predict_at.tolist() == [[2, 3, 0], [5, 6, 7], [11, 0, 0]]
    assert b.targets.tolist() == [[21, 22, 0], [23, 24, 25], [26, 0, 0]]


def test_packed_layout_by_hand():
    b = collate(ROWS, pad_id=0, packed=True)
    assert b.packed and b.attention_mask is None
    assert b.input_ids.tolist() == [[11, 12, 13, 21, 22, 14, 23, 24, 25, 15, 16, 26]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]]
    assert b.predict_at.tolist() == [[2, 3, 0], [5, 6, 7], [10, 0, 0]]
    assert b.targets.tolist() == [[21, 22, 0], [23, 24, 25], [26, 0, 0]]


@pytest.mark.parametrize("packed", [False, True])
def test_loss_layout_masks(packed):
    b = collate(ROWS, pad_id=0, packed=packed)
    assert b.completion_mask.tolist() == [[True, True, False], [True, True, True], [True, False, False]]
    assert b.loss_mask.tolist() == [[1, 1, 0], [1, 1, 1], [0, 0, 0]]  # row 2 is masked
    assert b.has_rollout_logp.tolist() == [[True, True, False], [False, False, False], [True, False, False]]
    assert b.rollout_logp.tolist() == [[-0.5, -0.25, 0], [0, 0, 0], [-1.5, 0, 0]]
    assert b.advantages.tolist() == [1.0, -1.0, 0.5] and b.advantages.dtype == torch.float32
    assert b.seq_weights.tolist() == [2.0, 1.0, 1.0] and b.seq_weights.dtype == torch.float32
    # Every predicting position is followed by its target in the model input.
    flat = b.input_ids.reshape(-1)
    assert torch.equal(flat[b.predict_at + 1][b.completion_mask], b.targets[b.completion_mask])
    moved = b.to("cpu")
    assert isinstance(moved, ModelBatch) and (moved.attention_mask is None) == packed


def test_collate_rejects_inconsistent_rows():
    with pytest.raises(ValueError, match="empty prompt"):
        collate([TrainingRow([], [1], None, 0.0)], 0, packed=True)
    with pytest.raises(ValueError, match="rollout log-probs"):
        collate([TrainingRow([1], [2, 3], [-1.0], 0.0)], 0, packed=False)
    with pytest.raises(ValueError):
        collate([], 0, packed=True)


# ---------------------------------------------------------------- packed == padded on a real model


@pytest.fixture(scope="module", params=["sdpa", "eager", VARLEN])
def policy(request):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(TINY_POLICY, dtype=torch.float32,
                                                attn_implementation=request.param).eval()


def varied_rows(seed: int = 0) -> list[TrainingRow]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 7), (1, 3), (12, 9), (3, 1), (8, 14), (2, 6)]  # prompt, completion
    rows = []
    for k, (p, c) in enumerate(shapes):
        prompt = torch.randint(1, 500, (p,), generator=g).tolist()
        completion = torch.randint(0, 500, (c,), generator=g).tolist()
        rows.append(TrainingRow(prompt, completion, None if k % 3 == 1 else [-1.0] * c,
                                advantage=float(k) - 2.5, weight=1.0 + k / 10, masked=(k == 4)))
    return rows


def loss_and_grads(model, batch, temperature):
    model.zero_grad(set_to_none=True)
    logp, entropy = completion_logprobs(model, batch, temperature, chunk_tokens=16, with_entropy=True)
    weights = batch.loss_mask * (batch.advantages * batch.seq_weights)[:, None]
    (logp * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logp.detach(), entropy, grads


def assert_same(a, b):
    (logp_a, ent_a, grads_a), (logp_b, ent_b, grads_b) = a, b
    torch.testing.assert_close(logp_a, logp_b, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent_a, ent_b, atol=2e-5, rtol=1e-5)
    for name in grads_a:
        # Summation order differs (one masked attention vs one per sequence), so float error
        # scales with the tensor's largest gradient; a leak across sequences is off by far more.
        scale = max(1.0, grads_b[name].abs().max().item())
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5 * scale, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_equals_padded(policy, temperature):
    rows = varied_rows()
    padded = loss_and_grads(policy, collate(rows, 0, packed=False), temperature)
    packed = loss_and_grads(policy, collate(rows, 0, packed=True), temperature)
    assert_same(packed, padded)
    assert padded[0][4].abs().sum() > 0, "masked rows still get log-probs (for metrics), only no loss weight"


def test_packed_equals_each_row_alone(policy):
    """The strongest form: a sequence's log-probs do not depend on what it is packed with."""
    rows = varied_rows(seed=1)
    together, _ = completion_logprobs(policy, collate(rows, 0, packed=True), 1.0, chunk_tokens=64)
    for i, row in enumerate(rows):
        alone, _ = completion_logprobs(policy, collate([row], 0, packed=True), 1.0, chunk_tokens=64)
        torch.testing.assert_close(together[i:i + 1, :alone.shape[1]].detach(), alone.detach(), atol=2e-5, rtol=1e-5)


def test_the_equality_detects_attention_leaking_across_sequences(policy):
    """Control: the packed row with an all-ones mask (positions still reset) lets attention cross
    sequence boundaries, and the comparison above must notice."""
    rows = varied_rows()
    padded = loss_and_grads(policy, collate(rows, 0, packed=False), 1.0)
    leaky = collate(rows, 0, packed=True)
    leaky.attention_mask, leaky.cu_seqlens = torch.ones_like(leaky.input_ids), None
    with pytest.raises(AssertionError):
        assert_same(loss_and_grads(policy, leaky, 1.0), padded)
