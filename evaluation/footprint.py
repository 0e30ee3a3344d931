"""What a model costs to store, and how sparse it is.

    size on disk:     bytes of the folder's weight files (tokenizer and config files left out); a
                      fake-quant folder holds dense dequantized weights, so this is their size
    bits per weight:  compress/bits.py (packed weights and their scales, as stored)
    sparsity:         exact zeros / all entries, over the weights of every nn.Linear but the
                      output head (the decoder's projections; embeddings are not Linear)
"""
from __future__ import annotations

from pathlib import Path

import torch

WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weight_bytes(model_dir: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).iterdir() if p.is_file() and p.name.endswith(WEIGHT_FILES))


def linear_sparsity(model: torch.nn.Module) -> float:
    head = model.get_output_embeddings()
    zeros = total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total
