"""Held-out perplexity over non-overlapping windows.

The documents are tokenized, each followed by the end-of-text token, and joined into one stream;
the stream is cut into consecutive windows of W tokens (the last one shorter). Within a window
every token after the first is predicted from the tokens before it in that window only:

    PPL = exp( Σ_windows Σ_{t ≥ 1} −log p(x_t | x_0 .. x_{t−1}) / Σ_windows (len − 1) )

a token-weighted mean, so a short last window counts for its tokens only. Every token but the
first of each window is scored exactly once.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from launch.preflight import lookup
from rl.data import load_rows, prompt_text


def held_out_documents(recipe, cfg, tokenizer) -> list[str]:
    """`cfg.perplexity_data` (.txt: one document; .jsonl: each row's `text`), else the eval split:
    each problem's prompt (by `tokenizer`'s chat template where the recipe uses one) followed by
    its answer field, as the policy should complete it."""
    if cfg.perplexity_data is not None:
        path = Path(cfg.perplexity_data)
        if path.suffix == ".txt":
            return [path.read_text()]
        if path.suffix == ".jsonl":
            return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
        raise ValueError(f"perplexity_data: {path} is neither a .txt nor a .jsonl file")
    data = recipe.data.for_split("eval")
    rows = load_rows(data.eval)[:cfg.limit]
    separator = "" if data.chat_template else " "  # a chat prompt ends with the assistant's header
    return [prompt_text(tokenizer, data, lookup(row, data.question_key)) + separator + str(lookup(row, data.answer_key))
            for row in rows]


def token_stream(tokenizer, documents: list[str]) -> list[int]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [t for ids in tokenizer(documents, add_special_tokens=False)["input_ids"] for t in ids + eos]


def token_windows(stream: list[int], window: int) -> list[list[int]]:
    """Consecutive `window`-token pieces of the stream; a last piece of one token (nothing to
    predict) is dropped."""
    pieces = [stream[i:i + window] for i in range(0, len(stream), window)]
    return [p for p in pieces if len(p) > 1]


@torch.no_grad()
def perplexity(model, windows: list[list[int]]) -> tuple[float, int]:
    """exp of the mean token NLL over the windows (see the module doc), and how many tokens it scored."""
    if not windows:
        raise ValueError("perplexity: the held-out text has fewer than 2 tokens")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for window in windows:
        ids = torch.tensor([window], device=device)
        logits = model(ids).logits[0, :-1].float()
        nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += len(window) - 1
    return math.exp(nll / count), count
