"""Hand-computed values for the per-token loss, its aggregation and the mismatch weights."""
import math

import pytest
import torch

from rl.aggregation import LOSS_AGG_MODES, aggregate
from rl.mismatch import mismatch_weights
from rl.policy_loss import clipped_policy_loss, k3_kl, token_loss

LN2 = math.log(2.0)


# ---------------------------------------------------------------- clipped surrogate

def test_clipping_both_ends_both_signs():
    # ρ = 0.5, 1, 1.5 against A = +2 (row 0) and A = −2 (row 1); ε_low = 0.2, ε_high = 0.28.
    ratios = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]])
    old = torch.zeros(2, 3)
    logp = torch.log(ratios).requires_grad_()
    adv = torch.tensor([2.0, -2.0])
    loss, clipped = clipped_policy_loss(logp, old, adv, 0.2, 0.28)
    # A=+2: ρ=.5 → −min(1.0, 0.8·2) = −1.0; ρ=1 → −2; ρ=1.5 → −min(3, 1.28·2) = −2.56 (clipped)
    # A=−2: ρ=.5 → −min(−1, −1.6) = 1.6 (clipped); ρ=1 → 2; ρ=1.5 → −min(−3, −2.56) = 3
    torch.testing.assert_close(loss, torch.tensor([[-1.0, -2.0, -2.56], [1.6, 2.0, 3.0]]))
    assert clipped.tolist() == [[False, False, True], [True, False, False]]
    # d loss / d logp = −Aρ where unclipped, 0 where clipped
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, -2.0, 0.0], [0.0, 2.0, 3.0]]))


def test_per_token_advantages_and_zero_advantage():
    logp = torch.log(torch.tensor([[2.0, 2.0]]))
    loss, clipped = clipped_policy_loss(logp, torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), 0.2, 0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 0.0]]))
    assert clipped.tolist() == [[True, False]]


def test_k3_known_values():
    logp = torch.zeros(3)
    ref = torch.tensor([0.0, LN2, -LN2])
    # d = 0 → 0; d = ln2 → 2 − ln2 − 1; d = −ln2 → 0.5 + ln2 − 1
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor([0.0, 0.3068528, 0.1931472]))


# ---------------------------------------------------------------- full per-token loss

def test_token_loss_composition_by_hand():
    logp = torch.zeros(2, 3, requires_grad=True)
    old = torch.zeros(2, 3)  # ρ = 1, policy term = −A
    adv = torch.tensor([1.0, -0.5])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    ref = torch.tensor([[0.0, LN2, 0.0], [-LN2, 0.0, 0.0]])
    is_w = torch.tensor([[2.0, 0.5, 1.0], [1.0, 1.0, 0.0]])
    loss, stats = token_loss(
        logp, old, adv, mask, eps_low=0.2, eps_high=0.2,
        kl_coef=0.1, ref_logp=ref, is_weights=is_w, seq_weights=torch.tensor([1.0, 2.0]),
    )
    # policy·w:  [[-2, -0.5, -1], [0.5, 0.5, 0]]
    # + 0.1·KL:  [[0, 0.0306853, 0], [0.0193147, 0, 0]]   (the weight does not touch the KL)
    # · seq_w:   row 1 doubled; padding (0, 2) zeroed
    expected = torch.tensor([[-2.0, -0.4693147, 0.0], [1.0386294, 1.0, 0.0]])
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(stats["kl"], torch.tensor([[0.0, 0.3068528, 0.0], [0.1931472, 0.0, 0.0]]))
    torch.testing.assert_close(stats["ratio"], torch.ones(2, 3))
    assert stats["clipped"].dtype == torch.bool and not stats["clipped"].any()
    assert not any(v.requires_grad for v in stats.values())


def test_token_loss_without_kl_and_errors():
    logp, old = torch.zeros(1, 2), torch.zeros(1, 2)
    loss, stats = token_loss(logp, old, torch.tensor([3.0]), torch.ones(1, 2), eps_low=0.2, eps_high=0.2)
    torch.testing.assert_close(loss, torch.full((1, 2), -3.0))
    assert set(stats) == {"clipped", "ratio", "policy"}
    torch.testing.assert_close(stats["policy"], loss)  # no KL term: the policy part is the whole loss
    with pytest.raises(ValueError, match="ref_logp"):
        token_loss(logp, old, torch.tensor([3.0]), torch.ones(1, 2), eps_low=0.2, eps_high=0.2, kl_coef=0.1)


def test_policy_stat_is_the_loss_without_its_kl_term():
    logp, old, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    mask, w = torch.tensor([[1.0, 1.0]]), torch.tensor([0.5])
    loss, stats = token_loss(logp, old, torch.tensor([2.0]), mask, eps_low=0.2, eps_high=0.2, kl_coef=0.1,
                             ref_logp=ref, seq_weights=w)
    torch.testing.assert_close(stats["policy"], torch.full((1, 2), -1.0))  # 0.5 · −(1 · 2)
    torch.testing.assert_close(loss - stats["policy"], 0.5 * 0.1 * stats["kl"])
    assert (stats["kl"] > 0).all()


def test_token_loss_padding_stays_finite():
    logp = torch.tensor([[0.0, float("-inf")]])
    loss, _ = token_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.tensor([[1, 0]]),
                         eps_low=0.2, eps_high=0.2, kl_coef=0.1, ref_logp=torch.zeros(1, 2))
    torch.testing.assert_close(loss, torch.tensor([[-1.0, 0.0]]))


# ---------------------------------------------------------------- aggregation

PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


@pytest.mark.parametrize("mode, expected", [
    ("grpo", 3.25),     # ((1+2)/2 + (4+5+6)/3) / 2
    ("bnpo", 3.6),      # 18 / 5
    ("dr_grpo", 2.25),  # 18 / (2 · 4)
    ("dapo", 3.6),      # 18 / 5
])
def test_aggregate_by_hand(mode, expected):
    out = aggregate(PER_TOKEN, MASK, mode, num_seqs=2, num_tokens=5, max_new_tokens=4, num_microbatches=1)
    assert out.item() == pytest.approx(expected)


def test_bnpo_depends_on_the_split():
    # One sequence per micro-batch: (3/2)/2 + (15/3)/2 = 3.25, not the 3.6 of one micro-batch.
    parts = [aggregate(PER_TOKEN[i:i + 1], MASK[i:i + 1], "bnpo", num_seqs=2, num_tokens=5,
                       max_new_tokens=4, num_microbatches=2) for i in range(2)]
    assert sum(parts).item() == pytest.approx(3.25)


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "dapo"])
def test_total_independent_of_microbatch_split(mode):
    g = torch.Generator().manual_seed(0)
    per_token = torch.randn(7, 5, generator=g)
    lengths = torch.tensor([5, 1, 3, 4, 2, 5, 3])
    mask = (torch.arange(5) < lengths[:, None]).long()
    counts = dict(num_seqs=7, num_tokens=int(mask.sum()), max_new_tokens=5)
    whole = aggregate(per_token, mask, mode, **counts, num_microbatches=1)
    # e.g. two ranks × two accumulation steps of uneven sizes
    splits = [(0, 1), (1, 4), (4, 6), (6, 7)]
    total = sum(aggregate(per_token[a:b], mask[a:b], mode, **counts, num_microbatches=len(splits))
                for a, b in splits)
    torch.testing.assert_close(total, whole)


def test_aggregate_modes_and_unknown():
    assert set(LOSS_AGG_MODES) == {"grpo", "bnpo", "dr_grpo", "dapo"}
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(PER_TOKEN, MASK, "seq_sum", num_seqs=2, num_tokens=5, max_new_tokens=4, num_microbatches=1)


# ---------------------------------------------------------------- rollout mismatch

# old − rollout per token; the last token of row 1 is padding and must be ignored.
DIFF = torch.tensor([[LN2, -LN2, math.log(4.0)], [math.log(0.25), 0.0, math.log(100.0)]])
MM_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ROLLOUT = torch.full((2, 3), -2.0)
OLD = ROLLOUT + DIFF
# k3 per token r − ln r − 1, summed over the 5 real tokens:
# (2 − ln2 − 1) + (0.5 + ln2 − 1) + (4 − ln4 − 1) + (0.25 + ln4 − 1) + 0 = 2.75
MISMATCH_KL = 2.75 / 5


def _weights(mode, level, c_min, c_max):
    return mismatch_weights(OLD, ROLLOUT, MM_MASK, mode=mode, level=level, c_min=c_min, c_max=c_max)


def test_token_tis():
    w, stats = _weights("tis", "token", 0.4, 3.0)  # raw [[2, .5, 4], [.25, 1, ·]]
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 3.0], [0.4, 1.0, 0.0]]))
    assert stats["is_clamped_frac"] == pytest.approx(2 / 5)
    assert stats["is_weight_mean"] == pytest.approx(6.9 / 5)
    assert stats["mismatch_kl"] == pytest.approx(MISMATCH_KL)


def test_token_mis():
    w, stats = _weights("mis", "token", 0.4, 3.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 0.0], [0.0, 1.0, 0.0]]))
    assert stats["is_masked_frac"] == pytest.approx(2 / 5)
    assert stats["is_weight_mean"] == pytest.approx(3.5 / 5)


def test_sequence_tis():
    # row 0: exp(ln2 − ln2 + ln4) = 4; row 1: exp(ln 0.25 + 0) = 0.25 (with the padding it would be 25)
    w, stats = _weights("tis", "sequence", 0.4, 5.0)
    torch.testing.assert_close(w, torch.tensor([[4.0, 4.0, 4.0], [0.4, 0.4, 0.0]]))
    assert stats["is_clamped_frac"] == pytest.approx(2 / 5)
    assert stats["is_weight_mean"] == pytest.approx(12.8 / 5)


def test_sequence_mis():
    w, stats = _weights("mis", "sequence", 0.4, 5.0)
    torch.testing.assert_close(w, torch.tensor([[4.0, 4.0, 4.0], [0.0, 0.0, 0.0]]))
    assert stats["is_masked_frac"] == pytest.approx(2 / 5)
    assert stats["is_weight_mean"] == pytest.approx(12 / 5)
    assert stats["mismatch_kl"] == pytest.approx(MISMATCH_KL)


def test_mismatch_none_and_no_grad():
    old = OLD.clone().requires_grad_()
    w, stats = mismatch_weights(old, ROLLOUT, MM_MASK, mode="none", level="token", c_min=0.0, c_max=3.0)
    assert w is None and stats == {"mismatch_kl": pytest.approx(MISMATCH_KL)}
    w, _ = mismatch_weights(old, ROLLOUT, MM_MASK, mode="tis", level="token", c_min=0.0, c_max=3.0)
    assert not w.requires_grad
    with pytest.raises(ValueError, match="mode"):
        _weights("clip", "token", 0.0, 3.0)
