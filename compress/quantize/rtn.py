"""Round-to-nearest quantization written as a compressed-tensors checkpoint (the format vLLM
serves and transformers loads), through compressed-tensors' own scheme, compressor and config
code; only the min-max scales are computed here.

    scale, zero point:  compressed-tensors' `calculate_qparams` on the min and max of each group
                        of `group_size` input columns (or each output channel, or the tensor)
    stored:             pack-quantized (int weights, A16), int-quantized (W8A8, dynamic per-token
                        int8 activations) or float-quantized / naive-quantized (FP8 weights)

Zeros stay zero under every scheme here (0 is on the grid of a symmetric scheme, and the integer
zero point of an asymmetric one maps back to exactly 0), so an N:M mask survives RTN.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


def quantization_scheme(name: str, group_size: int):
    """The compressed-tensors scheme for Linear layers: its preset `name` (W8A16_FP8: FP8 weights
    per output channel, activations left alone), int weight-only presets regrouped to `group_size`
    input columns per scale (0: one scale per output channel)."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationScheme,
        preset_name_to_scheme,
    )

    if name == "W8A16_FP8":
        return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False))
    scheme = preset_name_to_scheme(name, ["Linear"])
    if scheme.weights.strategy == "group":
        grouping = {"strategy": "group", "group_size": group_size} if group_size else \
                   {"strategy": "channel", "group_size": None}
        scheme.weights = QuantizationArgs(**{**scheme.weights.model_dump(), **grouping})
    return scheme


def weight_range(weight: Tensor, args) -> tuple[Tensor, Tensor]:
    """Min and max of `weight` over each unit that shares a scale under `args`."""
    w = weight.detach()
    if args.strategy == "group":
        if w.shape[1] % args.group_size:
            raise ValueError(f"group_size {args.group_size} does not divide a weight of shape {tuple(w.shape)}")
        w = w.reshape(w.shape[0], -1, args.group_size)
        return w.amin(-1), w.amax(-1)
    if args.strategy == "channel":
        return w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    return w.amin().reshape(1), w.amax().reshape(1)


@torch.no_grad()
def rtn_quantize(model: nn.Module, scheme, ignore: list[str], masks: dict[str, Tensor] | None = None) -> list[str]:
    """Attach `scheme` to the model's Linear layers (but `ignore`d ones) and set min-max scales.
    The model then runs fake-quantized; `save_compressed` writes it. Returns the quantized names."""
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import (
        calculate_qparams,
        is_module_quantized,
    )

    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore))
    names = []
    for name, module in model.named_modules():
        if not is_module_quantized(module):
            continue
        if masks and f"{name}.weight" in masks:
            module.weight.mul_(masks[f"{name}.weight"].to(module.weight.device))
        scale, zero_point = calculate_qparams(*weight_range(module.weight, scheme.weights), scheme.weights)
        module.weight_scale.data = scale.to(module.weight_scale.dtype)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data = zero_point.to(module.weight_zero_point.dtype)
        module.quantization_status = QuantizationStatus.FROZEN
        names.append(name)
    return names


def save_compressed(model: nn.Module, out_dir: str | Path) -> str:
    """Compress the fake-quantized model's weights and save a compressed-tensors checkpoint;
    returns its format (pack-quantized, int-quantized, ...)."""
    from compressed_tensors.compressors import ModelCompressor

    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out_dir)
    compressor.update_config(str(out_dir))
    return compressor.quantization_config.format


def module_scheme(config, module: str):
    """The scheme of the config group that targets `module` by name, else the one targeting Linear."""
    from compressed_tensors.utils.match import match_name

    groups = list(config.config_groups.values())
    named = [s for s in groups if any(match_name(module, t) for t in s.targets)]
    return (named or [s for s in groups if "Linear" in s.targets])[0]


@torch.no_grad()
def reapply_masks(model_dir: str | Path, masks: dict[str, Tensor]) -> int:
    """Zero the weights `masks` prunes in a saved checkpoint, quantized (compressed-tensors: each
    module is decompressed, masked and compressed again with its own scales) or dense. Returns how
    many nonzero pruned weights it found (GPTQ's error feedback writes into pruned positions; RTN
    leaves none)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model_dir = Path(model_dir)
    quantization = json.loads((model_dir / "config.json").read_text()).get("quantization_config")
    config = QuantizationConfig.model_validate(quantization) if quantization else None
    violations = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors, changed = load_file(path), False
        for param, keep in masks.items():
            module = param.removesuffix(".weight")
            local = {k[len(module) + 1:]: v for k, v in tensors.items() if k.startswith(f"{module}.weight")}
            if not local:
                continue
            if "weight" in local and "weight_scale" not in local:  # left dense
                weight = local["weight"]
                violations += int((weight[~keep] != 0).sum())
                tensors[param] = weight * keep.to(weight.dtype)
            else:
                scheme = module_scheme(config, module)
                compressor = BaseCompressor.get_value_from_registry(scheme.format or config.format)
                dense = compressor.decompress(local, scheme)
                violations += int((dense["weight"][~keep] != 0).sum())
                dense["weight"] = dense["weight"] * keep.to(dense["weight"].dtype)
                for key in local:
                    del tensors[f"{module}.{key}"]
                tensors.update({f"{module}.{k}": v.contiguous() for k, v in compressor.compress(dense, scheme).items()})
            changed = True
        if changed:
            save_file(tensors, path, metadata={"format": "pt"})
    return violations
