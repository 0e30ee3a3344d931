"""Greedy completions of the eval prompts, by vLLM where it serves the checkpoint, else transformers.

vLLM: one engine (a `RolloutGroup` of one) at a time. An artifact whose config.json matches the
loaded model's (dtype and bookkeeping keys aside) and whose weights are one safetensors file is
loaded into the running engine through the file weight transport (rollout/weight_sync.py: the
model's own weight loaders) instead of starting a new engine; any other starts a new one. An
artifact the engine cannot start on or run (a quantization format vLLM does not serve here) is
handed back with the reason, for transformers to generate.

transformers: `generate` with greedy decoding on left-padded batches; a completion ends at the
first end-of-sequence token, which counts as one of its tokens, as in vLLM's output.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rl.liveness import WorkerError, WorkerFailure

# config.json keys that do not change which tensors a checkpoint holds or how vLLM builds the model
# (vLLM casts loaded weights to the engine's dtype).
CONFIG_BOOKKEEPING = ("_name_or_path", "transformers_version", "torch_dtype", "dtype")


@dataclass
class Generated:
    engine: str              # "vllm" or "transformers"
    completions: list[dict]  # per prompt: {"text", "token_ids"}
    seconds: float           # wall time of generating alone (no model loading)

    @property
    def tokens_per_s(self) -> float:
        return sum(len(c["token_ids"]) for c in self.completions) / self.seconds


def architecture(model_dir: str | Path) -> dict:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return {k: v for k, v in config.items() if k not in CONFIG_BOOKKEEPING}


def reloadable(model_dir: str | Path, loaded: dict | None) -> Path | None:
    """The weights file to load into an engine serving a model of architecture `loaded`, or None
    when the model needs an engine of its own (see the module doc)."""
    files = list(Path(model_dir).glob("*.safetensors"))
    config = architecture(model_dir)
    if len(files) != 1 or config != loaded:
        return None
    return files[0]


def generate_with_vllm(models: dict[str, str], prompts: list[list[int]], sampling, start_engine: Callable,
                       timeout_s: float, log=print) -> dict[str, Generated | str]:
    """{artifact: Generated} for the artifacts vLLM generated, {artifact: reason} for the others.
    `start_engine(model_path)` returns a ready RolloutGroup of one engine."""
    out: dict[str, Generated | str] = {}
    engine, loaded = None, None  # the running engine and the architecture of its model
    try:
        for name, path in models.items():
            weights = reloadable(path, loaded)
            try:
                if weights is not None:
                    engine.load_weights("file", str(weights), timeout_s)
                    log(f"{name}: weights loaded into the running vLLM engine")
                else:
                    if engine is not None:
                        engine.shutdown()
                        engine = None
                    engine, loaded = start_engine(path), architecture(path)
                start = time.perf_counter()
                outputs = engine.generate(prompts, sampling, mode="eval")
                out[name] = Generated("vllm", [{"text": o[0]["text"], "token_ids": o[0]["token_ids"]} for o in outputs],
                                      time.perf_counter() - start)
            except (WorkerFailure, WorkerError) as failure:
                if engine is not None:
                    engine.shutdown()
                engine, loaded = None, None
                out[name] = f"vLLM could not run it: {failure}"
                log(f"{name}: {out[name]}; transformers will generate")
    finally:
        if engine is not None:
            engine.shutdown()
    return out


@torch.no_grad()
def generate_with_transformers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                               batch_size: int) -> Generated:
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stops), 0)
    completions, seconds = [], 0.0
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first:first + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=pad)
        seconds += time.perf_counter() - start
        for row in out[:, width:].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            text = tokenizer.decode([t for t in row[:end] if t not in stops], skip_special_tokens=True)
            completions.append({"text": text, "token_ids": row[:end]})
    return Generated("transformers", completions, seconds)
