"""Calibration data for compression stages: token sequences from the recipe's prompts, or from the
rollouts an earlier RL stage persisted (prompt + completion: the distribution the policy serves)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from launch.schema_base import Strict
from rl.fileio import read_jsonl


class CalibrationConfig(Strict):
    source: Literal["auto", "prompts", "rollouts"] = Field(
        "auto", description="`rollouts`: the prompt + completion samples an input RL stage persisted; `prompts`: "
                            "the recipe's train prompts; `auto`: rollouts when an input has them, else prompts.")
    samples: int = Field(64, ge=1, description="Sequences used for calibration.")
    max_tokens: int = Field(256, ge=8, description="Each sequence is cut to this many tokens.")


def rollout_samples(inputs: dict[str, dict]) -> Path | None:
    """The persisted rollouts of the first input stage that has them."""
    return next((Path(a["rollouts"]) for a in inputs.values() if a.get("rollouts")), None)


def calibration_sequences(recipe, inputs: dict[str, dict], cfg: CalibrationConfig) -> tuple[list[list[int]], str]:
    """Up to `cfg.samples` token id sequences (each at most `cfg.max_tokens` long) and where they came from."""
    rollouts = rollout_samples(inputs)
    if cfg.source == "rollouts" and rollouts is None:
        raise ValueError("calibration.source is 'rollouts', but no input stage persisted rollouts "
                         "(an `rl` stage among `needs` does)")
    if cfg.source != "prompts" and rollouts is not None:
        rows = read_jsonl(rollouts)[-cfg.samples:]  # the latest: sampled by the policy closest to the one compressed
        sequences, origin = [r["prompt_ids"] + r["completion_ids"] for r in rows], f"rollouts ({rollouts})"
    else:
        from rl.data import load_problems
        sequences, _ = load_problems(recipe, "train", cfg.samples)
        origin = f"train prompts ({recipe.data.train.path})"
    sequences = [s[:cfg.max_tokens] for s in sequences if s][:cfg.samples]
    if not sequences:
        raise ValueError(f"no calibration sequences in {origin}")
    return sequences, origin
