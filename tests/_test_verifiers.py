"""Verifiers that misbehave on purpose, for tests/test_rewards.py.

They live in their own module because the reward pool's worker processes (forkserver/spawn)
import a verifier by module and name: a test-local function would not be importable there.
"""
import os
import time


def sleepy(completion: str, reference: str) -> float:
    if completion == "sleep":
        time.sleep(60)
    return 1.0


def faulty(completion: str, reference: str) -> float:
    if completion == "raise":
        raise RuntimeError("verifier failed")
    if completion == "nan":
        return float("nan")
    if completion == "die":
        os._exit(3)  # the worker process disappears mid-task
    return 1.0
