"""Rewards: GSM8K and MATH (last \\boxed{}) answers, verifiers by name, and a process pool that scores with them."""
from rewards.pool import RewardPool, RewardResult, max_chars_for
from rewards.verifiers import VERIFIERS, register

__all__ = ["RewardPool", "RewardResult", "VERIFIERS", "max_chars_for", "register"]
