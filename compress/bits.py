"""Bits per weight of a saved model's decoder Linear layers, as stored:

    compressed-tensors checkpoint:  every tensor of a quantized Linear (packed or int8/FP8 weights,
                                    scales, zero points, g_idx, shape) at its storage width
    mixed 1-bit/4-bit:              the packed layout `quantization_layout.json` describes (bitmaps,
                                    signs, 4-bit codes, per-group fp16 scales), not the dequantized
                                    weights the folder holds
    dense:                          the weights' dtype width (32 for float32, 16 for bfloat16)

    bits per weight = Σ stored bits / Σ weights, over the Linear weights under `layers.<i>.`

Embeddings, the output head, norms and biases are left out: quantization leaves them dense.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

LAYOUT_FILE = "quantization_layout.json"
DECODER = re.compile(r"(^|\.)layers\.\d+\.")


def dtype_bits(name: str) -> int:
    """Storage width of a safetensors dtype name: F32 -> 32, BF16 -> 16, F8_E4M3 -> 8, BOOL -> 8."""
    return 8 if name == "BOOL" else int(re.search(r"\d+", name).group())


def stored_tensors(model_dir: Path) -> dict[str, dict[str, tuple[list[int], str, list | None]]]:
    """module -> {`weight*` tensor suffix -> (shape, dtype, value of `weight_shape`)} for the modules
    under a decoder layer."""
    from safetensors import safe_open

    modules: dict[str, dict] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                module, _, suffix = name.rpartition(".")
                if DECODER.search(module) and suffix.startswith("weight"):
                    piece = f.get_slice(name)
                    value = f.get_tensor(name).tolist() if suffix == "weight_shape" else None
                    modules.setdefault(module, {})[suffix] = (piece.get_shape(), piece.get_dtype(), value)
    return modules


def weight_bits(model_dir: str | Path) -> dict:
    """Stored bits of the decoder's Linear weights (module doc), with the share of each tensor kind."""
    model_dir = Path(model_dir)
    layout_path = model_dir / LAYOUT_FILE
    sidecar = json.loads(layout_path.read_text()) if layout_path.exists() else None
    layout = sidecar["modules"] if sidecar else {}
    quantization = json.loads((model_dir / "config.json").read_text()).get("quantization_config")
    breakdown: dict[str, int] = {}
    params = linears = 0
    for module, tensors in stored_tensors(model_dir).items():
        if "weight_shape" in tensors:
            shape = tensors["weight_shape"][2]
        elif len(tensors.get("weight", ([],))[0]) == 2:
            shape = tensors["weight"][0]
        else:  # a norm's 1-D weight
            continue
        linears += 1
        params += math.prod(shape)
        parts = layout[module]["bits"] if module in layout else \
            {suffix: math.prod(s) * dtype_bits(dtype) for suffix, (s, dtype, _) in tensors.items()}
        for part, bits in parts.items():
            breakdown[part] = breakdown.get(part, 0) + bits
    total = sum(breakdown.values())
    if layout:
        storage = f"{sidecar['format']} (fake-quant: bits of the packed layout)"
    elif quantization:
        storage = f"{quantization.get('quant_method')} {quantization.get('format')}"
    else:
        storage = "dense"
    return {"bits_per_weight": total / params if params else None, "bits": total, "weights": params,
            "linear_layers": linears, "format": storage, "bits_by_tensor": breakdown}


def bits_per_weight(model_dir: str | Path) -> float | None:
    """Bits per weight of the decoder's Linear layers (see `weight_bits`); None without any."""
    return weight_bits(model_dir)["bits_per_weight"]
