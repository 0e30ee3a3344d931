"""Step-GRPO's step-aware relative reward and step counting, against hand-computed groups."""
from __future__ import annotations

import math

import pytest
import torch

from rl.collate import collate
from rl.rows import TrainingRow
from rl.step_reward import count_steps, efficiency_factors, step_aware_rewards

ALPHA, BETA = 0.9, 0.5


def paper_reward(acc: list[int], fmt: list[int], steps: list[int], beta=BETA, mu_over="correct") -> list[float]:
    """R_i = alpha*acc_i*f_i + (1-alpha)*fmt_i through the shaping hook, as the controller applies it."""
    base = torch.tensor([ALPHA * a + (1 - ALPHA) * f for a, f in zip(acc, fmt)])
    factors = efficiency_factors(torch.tensor(steps), torch.tensor(acc, dtype=torch.bool), len(acc), beta, mu_over)
    return step_aware_rewards(base, torch.tensor(acc, dtype=torch.float32), ALPHA, factors).tolist()


def test_no_correct_answer_keeps_factor_one():
    assert paper_reward([0, 0, 0], [1, 0, 1], [1, 5, 9]) == pytest.approx([0.1, 0.0, 0.1])


def test_one_correct_answer_is_its_own_mean():
    assert paper_reward([0, 1, 0], [1, 1, 0], [2, 7, 1]) == pytest.approx([0.1, 1.0, 0.0])


def test_ties_and_mu_equal_to_k():
    # Two correct with k = 3: mu = 3, tanh(0) = 0, both keep the full accuracy reward.
    assert paper_reward([1, 1, 0, 0], [1, 1, 1, 0], [3, 3, 1, 8]) == pytest.approx([1.0, 1.0, 0.1, 0.0])


def test_fewer_steps_than_the_group_score_more():
    # Correct k = 1 and 3: mu = 2; f = 1 - 0.5*tanh(-1/2) and 1 - 0.5*tanh(1/2).
    t = math.tanh(0.5)
    expected = [0.9 * (1 + 0.5 * t) + 0.1, 0.9 * (1 - 0.5 * t) + 0.1, 0.1]
    assert paper_reward([1, 1, 0], [1, 1, 1], [1, 3, 2]) == pytest.approx(expected)
    assert expected[0] == pytest.approx(1.2079527, abs=1e-6)  # 0.9 * 1.2310586 + 0.1


def test_mu_over_all_counts_incorrect_steps():
    # mu over all three = (1 + 3 + 8)/3 = 4; the incorrect one still keeps f = 1.
    expected = [0.9 * (1 - 0.5 * math.tanh(-3 / 4)) + 0.1, 0.9 * (1 - 0.5 * math.tanh(-1 / 4)) + 0.1, 0.1]
    assert paper_reward([1, 1, 0], [1, 1, 1], [1, 3, 8], mu_over="all") == pytest.approx(expected)


def test_beta_zero_is_plain_accuracy_and_groups_are_separate():
    assert paper_reward([1, 1, 0], [1, 1, 1], [1, 9, 2], beta=0.0) == pytest.approx([1.0, 1.0, 0.1])
    # Two groups of 2: each has its own mu.
    f = efficiency_factors(torch.tensor([1, 3, 5, 5]), torch.tensor([True, True, True, False]), 2, BETA)
    assert f.tolist() == pytest.approx([1 + 0.5 * math.tanh(0.5), 1 - 0.5 * math.tanh(0.5), 1.0, 1.0])


@pytest.mark.parametrize("text, steps", [
    ("no trigger at all", 1),
    ("x = 3.\nWait, let me check: 3.\nWait, is it 3? Yes.", 3),
    ("Waiting for it. Await the result. Waited.", 1),     # not standalone words
    ("wait, WAIT, Wait.", 2),                              # case-sensitive: only "Wait"
    ("(Wait)Wait_Wait3", 4),                               # digits and punctuation are not letters
    ("", 1),
])
def test_count_steps_counts_standalone_triggers(text, steps):
    assert count_steps(text, ["Wait"]) == steps


def test_count_steps_with_several_triggers():
    assert count_steps("Wait. Alternatively, x. Alternatively5 Alternativelyy", ["Wait", "Alternatively"]) == 4
    assert count_steps("a.b Wait", ["a.b"]) == 2  # triggers are literal text, not patterns


def test_inserted_tokens_have_no_rollout_logprob_and_follow_train_inserted():
    """Inserted tokens get mismatch ratio 1 (no engine log-prob) and are in the loss unless
    `loss.train_inserted` is off; the loss-token count follows."""
    row = dict(prompt_ids=[5, 6], completion_ids=[7, 8, 9, 10], rollout_logprobs=[-0.5, None, None, -0.25],
               advantage=1.0, inserted=[False, True, True, False])
    trained, skipped = TrainingRow(**row), TrainingRow(**row, train_inserted=False)
    for packed in (False, True):
        batch = collate([trained, skipped], pad_id=0, packed=packed)
        assert batch.has_rollout_logp.tolist() == [[True, False, False, True]] * 2
        assert batch.rollout_logp[0].tolist() == [-0.5, 0.0, 0.0, -0.25]
        assert batch.loss_mask.tolist() == [[1, 1, 1, 1], [1, 0, 0, 1]]
    assert (trained.loss_tokens, skipped.loss_tokens) == (4, 2)
    masked = TrainingRow(**row, masked=True)
    assert masked.loss_tokens == 0 and collate([masked], 0, False).loss_mask.sum() == 0
    with pytest.raises(ValueError, match="inserted flags"):
        collate([TrainingRow(**{**row, "inserted": [True]})], 0, False)
