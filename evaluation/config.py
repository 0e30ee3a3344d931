"""The eval stage's recipe section."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from launch.schema_base import OneWorkerStage


class EvalStage(OneWorkerStage):
    kind: Literal["eval"] = "eval"
    include_base: bool = Field(True, description="Also evaluate the recipe's starting model.")
    max_new_tokens: int = Field(256, ge=1, description="Tokens each greedy completion may run to.")
    limit: int | None = Field(
        None, ge=1, description="Evaluate only the first N eval problems (accuracy, and the perplexity text drawn "
                                "from the eval split).")
    accuracy: Literal["gsm8k_accuracy", "boxed_accuracy"] | None = Field(
        None, description="The verifier whose score > 0 makes a greedy completion correct; None: the accuracy "
                          "verifier of the recipe's first rl stage (`rewards.accuracy`), else gsm8k_accuracy.")
    cpu_kvcache_gib: int = Field(1, ge=1, description="KV cache of a CPU vLLM engine, GiB.")
    perplexity_data: str | None = Field(
        None, description="Held-out text for perplexity: a .txt file (one document) or a .jsonl file (its rows' "
                          "`text` field); None: the eval split, each problem's prompt followed by its answer field.")
    perplexity_window: int = Field(
        2048, ge=2, description="Tokens per perplexity window (non-overlapping; capped at the model's "
                                "`max_position_embeddings`).")
    fallback_batch_size: int = Field(
        16, ge=1, description="Prompts per transformers `generate` call for a model vLLM cannot serve.")
