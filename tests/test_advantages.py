import math

import pytest
import torch

from rl.advantages import group_advantages

# Group [1, 0, 0, 1]: mean 0.5, Bessel std sqrt(4 · 0.25 / 3) = sqrt(1/3) = 0.57735.
GROUP_STD = math.sqrt(1 / 3)
# Batch [1, 0, 0, 1, 1, 1, 1, 1]: mean 0.75, squares 6 · 0.0625 + 2 · 0.5625 = 1.5, std sqrt(1.5 / 7).
BATCH_STD = math.sqrt(1.5 / 7)
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_group_scale_by_hand():
    a = 0.5 / (GROUP_STD + 1e-4)  # 0.865875...
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(REWARDS, 4), expected)
    assert a == pytest.approx(0.8658754, abs=1e-6)


def test_batch_scale_by_hand():
    a = 0.5 / (BATCH_STD + 1e-4)  # 1.079890...
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(REWARDS, 4, scale="batch"), expected)
    assert a == pytest.approx(1.0798902, abs=1e-6)


def test_no_scale_is_centred_reward():
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(REWARDS, 4, scale="none"), expected)


def test_uneven_group_and_eps():
    # [2, 0, 1]: mean 1, deviations (1, -1, 0), std sqrt(2 / 2) = 1.
    out = group_advantages(torch.tensor([2.0, 0.0, 1.0]), 3, eps=1e-4)
    torch.testing.assert_close(out, torch.tensor([1 / 1.0001, -1 / 1.0001, 0.0]))


def test_all_equal_group_is_zero_for_every_scale():
    rewards = torch.full((6,), 0.7)
    for scale in ("group", "batch", "none"):
        assert torch.equal(group_advantages(rewards, 3, scale=scale), torch.zeros(6))


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, scale="global")
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 1)
