"""The quantize stage: writes the quantized model (`model/`, tokenizer files copied from the input)
and stage.json (method, backend, format, bits per weight, mask handling, calibration).

    rtn               compressed-tensors checkpoint, in process, no calibration
    gptq,             compressed-tensors checkpoint written by llm-compressor in its own Ray pip
    smoothquant_gptq  environment (compress/quantize/llmcompressor_backend.py)
    mixed_1bit_4bit   Squeeze10-style (our reconstruction of an unreleased method), fake-quant:
                      dequantized weights in a normal HF folder + quantization_layout.json

After a sparsify stage, its masks are re-applied to the saved weights (RTN and the mixed
quantizer keep zeros zero; GPTQ's error feedback does not) and its masks file is passed on.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from compress.artifacts import copy_tokenizer_files
from compress.bits import LAYOUT_FILE, weight_bits
from compress.calibration import calibration_sequences
from compress.quantize.config import LLMCOMPRESSOR_METHODS, MixedConfig
from compress.quantize.layerwise import (
    LinearInputs,
    decoder_inputs,
    decoder_layers,
    quantize_stack,
    run_decoder_layer,
)
from compress.quantize.mixed import fit_binary_scale, mixed_quantize, storage_bits
from compress.quantize.rtn import (
    quantization_scheme,
    reapply_masks,
    rtn_quantize,
    save_compressed,
)
from rl.fileio import write_json_atomic

MIXED_LABEL = ("Squeeze10-style mixed 1-bit/4-bit weights (PBAR selection, FIAS calibration): our reconstruction "
               "of an unreleased method, not the authors' code; stored fake-quantized (dequantized weights, the "
               f"packed layout described in {LAYOUT_FILE})")
PACKING = {
    "selection_bitmap": "1 bit per weight: 1 = stored in 4 bits",
    "sparsity_bitmap": "1 bit per weight when an input sparsity mask exists: 0 = pruned (stored as nothing else)",
    "signs": "1 bit per binarised weight: value = ±alpha of its group",
    "codes_4bit": "4 bits per kept weight: value = min + code * scale of its group",
    "alpha_fp16": "16 bits per group: the binary scale",
    "min_scale_fp16": "2 x 16 bits per group: min and scale of the 4-bit grid",
}


def mixed_quantize_model(model: torch.nn.Module, sequences: list[list[int]], cfg: MixedConfig, ignore: list[str],
                         masks: dict[str, torch.Tensor] | None, log) -> dict[str, dict]:
    """Quantize the decoder's Linears (but `ignore`d ones) in place, layer by layer; returns each
    one's packed layout."""
    from compressed_tensors.utils.match import match_name

    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(cfg.seed)
    layout = {}

    def quantize(name: str, linear: torch.nn.Linear, inputs: LinearInputs) -> None:
        if any(match_name(name, pattern) for pattern in ignore):
            return
        valid = None if masks is None else masks[f"{name}.weight"].to(device)
        mixed = mixed_quantize(linear.weight, inputs.norm, keep_fraction=cfg.keep_fraction, group_size=cfg.group_size,
                               selection=cfg.selection, valid=valid, generator=generator)
        mixed = fit_binary_scale(linear.weight, mixed, inputs.gram, inputs.cross)
        linear.weight.copy_(mixed.weight)
        layout[name] = {"shape": list(linear.weight.shape), "group_size": cfg.group_size or linear.in_features,
                        "kept_4bit": int(mixed.kept.sum()), "binarised": int((mixed.valid & ~mixed.kept).sum()),
                        "pruned": int((~mixed.valid).sum()),
                        "bits": storage_bits(mixed, cfg.group_size, sparse=valid is not None)}

    name, layers = decoder_layers(model)
    items = decoder_inputs(model, layers, sequences)
    quantize_stack(list(layers), items, run_decoder_layer, quantize, fias=cfg.fias, prefix=f"{name}.", log=log)
    return layout


def quantize_model(model_path: str, out_dir: str, cfg, calibration: list[list[int]], *,
                   masks_path: str | None = None, ray_options: dict | None = None,
                   trust_remote_code: bool = False) -> dict:
    """Quantize the HF causal LM at `model_path` by `cfg` (a QuantizeStage) into `out_dir`;
    `calibration`: token sequences (unused by rtn). gptq/smoothquant_gptq start a Ray task placed
    by `ray_options` (call them where Ray runs, outside the stage's own worker). Returns the
    stage summary."""
    from transformers import AutoModelForCausalLM

    def log(line: str) -> None:
        print(f"[{cfg.name}] {line}", flush=True)

    start = time.perf_counter()
    masks = load_file(masks_path) if masks_path else None
    out = Path(out_dir)
    summary = {"method": cfg.method}
    if cfg.method in LLMCOMPRESSOR_METHODS:
        from compress.quantize.llmcompressor_backend import run_llmcompressor

        log(f"{cfg.method} {cfg.scheme} through llm-compressor in a Ray pip environment {cfg.llmcompressor.pip}")
        scheme = quantization_scheme(cfg.scheme, cfg.group_size)
        versions = run_llmcompressor(model_path, out_dir, cfg, calibration, scheme, ray_options or {},
                                     trust_remote_code)
        summary["backend"] = f"llm-compressor {versions['llmcompressor']} (Ray pip environment: {versions})"
    else:
        device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto", trust_remote_code=trust_remote_code)
        model.to(device).eval()
        if cfg.method == "rtn":
            import compressed_tensors

            names = rtn_quantize(model, quantization_scheme(cfg.scheme, cfg.group_size), cfg.ignore, masks)
            log(f"rtn {cfg.scheme}: {len(names)} Linear layers")
            save_compressed(model.to("cpu"), out)
            summary["backend"] = f"compressed-tensors {compressed_tensors.__version__} (in process)"
        else:
            log(f"mixed 1-bit/4-bit on {len(calibration)} calibration sequences ({model.dtype}, {device})")
            layout = mixed_quantize_model(model, calibration, cfg.mixed, cfg.ignore, masks, log)
            model.save_pretrained(out)
            write_json_atomic(out / LAYOUT_FILE, {
                "format": "mixed-1bit-4bit", "method": MIXED_LABEL, "packing": PACKING,
                "parameters": cfg.mixed.model_dump(mode="json"), "modules": layout})
            summary.update(label=MIXED_LABEL, backend="prunerl (fake-quant)")
    copy_tokenizer_files(Path(model_path), out)
    summary["mask_violations_fixed"] = None if masks is None else reapply_masks(out, masks)
    bits = weight_bits(out)
    summary.update({
        "format": bits["format"],
        "parameters": cfg.model_dump(mode="json", include={"method", "scheme", "group_size", "ignore"} | (
            {"mixed"} if cfg.method == "mixed_1bit_4bit" else {"llmcompressor"} if cfg.method != "rtn" else set())),
        "bits_per_weight": bits["bits_per_weight"],
        "bits": bits,
        "mask_reapplied": masks is not None,
        "masks": masks_path,
        "calibration_sequences": len(calibration),
        "calibration_tokens": sum(len(s) for s in calibration),
        "wall_time_s": time.perf_counter() - start,
    })
    log(f"{bits['bits_per_weight']:.3f} bits per weight ({bits['format']}), {summary['wall_time_s']:.1f}s")
    return summary


def run_quantize_stage(ctx) -> dict:
    cfg, stage_dir = ctx.stage, Path(ctx.stage_dir)
    out_dir, stage_json = stage_dir / "model", stage_dir / "stage.json"
    masks = ctx.input_masks()
    record = {"model": str(out_dir), "masks": None if masks is None else str(masks), "stage_json": str(stage_json)}
    if ctx.resume and stage_json.exists():
        print(f"[{cfg.name}] already done ({stage_json})", flush=True)
        return record
    sequences, origin = ([], None) if cfg.method == "rtn" else \
        calibration_sequences(ctx.recipe, ctx.inputs, cfg.calibration)
    stage_dir.mkdir(parents=True, exist_ok=True)
    args = (str(ctx.input_model()), str(out_dir), cfg, sequences)
    kwargs = {"masks_path": record["masks"], "trust_remote_code": ctx.recipe.model.trust_remote_code}
    if cfg.method in LLMCOMPRESSOR_METHODS:  # its own Ray task takes the stage's reserved resources
        summary = quantize_model(*args, **kwargs, ray_options=ctx.placement.options("main", 0))
    else:
        summary = ctx.remote(quantize_model, *args, **kwargs)
    write_json_atomic(stage_json, {**summary, "calibration_origin": origin})
    return record
