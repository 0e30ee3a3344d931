"""Sequential layer-by-layer calibration of a Hugging Face decoder (`model.model.layers`).

One dense forward on the calibration sequences captures the inputs of decoder layer 0 and the
keyword arguments the model passes each layer (rotary `position_embeddings` from
`model.model.rotary_emb`, the attention mask of the layer's type, positions). Then, for each
decoder layer in order: forward hooks on its Linear layers accumulate per input feature Σx, Σx²
and the token count; every Linear is pruned; the pruned layer is run again to give the next
layer's inputs. Each layer is thus calibrated on the outputs of the already-pruned
layers before it. Embeddings and the LM head are left dense.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class FeatureStats:
    """Running per-input-feature sums over calibration tokens (float64)."""
    total: Tensor
    total_sq: Tensor
    count: int = 0

    @classmethod
    def zeros(cls, features: int, device) -> FeatureStats:
        return cls(torch.zeros(features, dtype=torch.float64, device=device),
                   torch.zeros(features, dtype=torch.float64, device=device))

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.total += x.sum(0)
        self.total_sq += x.square().sum(0)
        self.count += x.shape[0]

    @property
    def norm(self) -> Tensor:
        """‖X_j‖₂ over all calibration tokens."""
        return self.total_sq.sqrt().float()

    @property
    def mean(self) -> Tensor:
        return (self.total / self.count).float()

    @property
    def var(self) -> Tensor:
        return (self.total_sq / self.count - (self.total / self.count).square()).clamp_min(0).float()


# prune(name, linear, stats) -> bool keep-mask of linear.weight; `name` is the weight's parameter name.
PruneFn = Callable[[str, nn.Linear, FeatureStats], Tensor]


# A decoder layer's (args, kwargs), one call per calibration sequence.
Calls = list[tuple[tuple, dict]]


def capture_layer_calls(model: nn.Module, sequences: list[list[int]], device) -> tuple[list[tuple], list[list[dict]]]:
    """One forward per sequence (batch of one: no padding) of the decoder stack; returns the
    positional arguments (hidden states first) of decoder layer 0 per sequence, and every layer's
    keyword arguments per sequence (layers may differ: sliding-window layers get their own mask)."""
    layers = model.model.layers
    layer0_args, layer_kwargs = [], [[] for _ in layers]

    def grab(index):
        def hook(_module, args, kwargs):
            if index == 0:
                layer0_args.append(args)
            layer_kwargs[index].append({k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")})
        return hook

    handles = [layer.register_forward_pre_hook(grab(index), with_kwargs=True) for index, layer in enumerate(layers)]
    try:
        for sequence in sequences:
            model.model(torch.tensor([sequence], device=device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return layer0_args, layer_kwargs


def run_layer(layer: nn.Module, calls: Calls) -> list[tuple]:
    """The layer's outputs, as the next layer's positional arguments."""
    outputs = []
    for args, kwargs in calls:
        out = layer(*args, use_cache=False, **kwargs)
        outputs.append((out[0] if isinstance(out, tuple) else out, *args[1:]))
    return outputs


def collect_stats(layer: nn.Module, calls: Calls) -> dict[str, FeatureStats]:
    """Input statistics of every Linear of `layer` (keyed by its name inside the layer)."""
    linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    stats = {name: FeatureStats.zeros(m.in_features, m.weight.device) for name, m in linears.items()}
    handles = [m.register_forward_hook(lambda _m, args, _out, s=stats[name]: s.add(args[0]))
               for name, m in linears.items()]
    try:
        run_layer(layer, calls)
    finally:
        for handle in handles:
            handle.remove()
    return stats


@torch.no_grad()
def prune_decoder_layers(model: nn.Module, sequences: list[list[int]], prune: PruneFn,
                         log: Callable[[str], None] = print) -> dict[str, Tensor]:
    """Prune every Linear of every decoder layer in place, layer by layer (see the module doc);
    returns the bool keep-masks (on CPU) keyed by weight parameter name."""
    module_names = {module: name for name, module in model.named_modules()}
    layer_args, layer_kwargs = capture_layer_calls(model, sequences, next(model.parameters()).device)
    layers = model.model.layers
    masks = {}
    for index, layer in enumerate(layers):
        start, kept, total = time.perf_counter(), 0, 0
        calls = list(zip(layer_args, layer_kwargs[index]))
        stats = collect_stats(layer, calls)
        for name, linear in layer.named_modules():
            if isinstance(linear, nn.Linear):
                param = f"{module_names[linear]}.weight"
                keep = prune(param, linear, stats[name])
                linear.weight.masked_fill_(~keep, 0)
                masks[param] = keep.cpu()
                kept, total = kept + int(keep.sum()), total + keep.numel()
        layer_args = run_layer(layer, calls)
        log(f"layer {index + 1}/{len(layers)}: sparsity {1 - kept / total:.4f} "
            f"({time.perf_counter() - start:.1f}s)")
    return masks
