"""The sparsify stage: Wanda or magnitude masks, optionally refined by DSnoT, set layer by layer on
calibration sequences. Writes the pruned model (input dtype, tokenizer files copied), the bool
keep-masks (`masks.safetensors`, keyed by weight parameter name) and stage.json."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from compress.artifacts import copy_tokenizer_files
from compress.calibration import calibration_sequences
from compress.sparsify.dsnot import dsnot_refine, expected_error
from compress.sparsify.layerwise import FeatureStats, PruneFn, prune_decoder_layers
from compress.sparsify.nm import is_n_m
from compress.sparsify.wanda import wanda_mask
from rl.fileio import write_json_atomic


def is_attention(param: str) -> bool:
    return "attn" in param or "attention" in param


def linear_pruner(cfg, report: dict[str, dict]) -> PruneFn:
    """The keep-mask of one Linear under `cfg` (a SparsifyStage); records each weight's numbers in `report`."""
    def prune(param: str, linear: nn.Linear, stats: FeatureStats) -> Tensor:
        norm = stats.norm if cfg.method == "wanda" else torch.ones_like(stats.norm)
        keep = wanda_mask(linear.weight, norm, cfg.sparsity, cfg.n_m)
        entry = report.setdefault(param, {})
        if cfg.dsnot is not None and (cfg.dsnot.refine_mlp or is_attention(param)):
            refined = dsnot_refine(linear.weight, keep, stats.mean, stats.var, stats.norm,
                                   max_cycle=cfg.dsnot.cycles(linear.in_features), threshold=cfg.dsnot.threshold,
                                   gamma=cfg.dsnot.gamma, n_m=cfg.n_m)
            entry["dsnot"] = {
                "mean_abs_expected_error_before": expected_error(linear.weight, keep, stats.mean).abs().mean().item(),
                "mean_abs_expected_error_after": refined.error.abs().mean().item(),
                "rows_converged": refined.converged.float().mean().item(),
                "weights_swapped": int((refined.keep & ~keep).sum())}
            keep = refined.keep
        entry["sparsity"] = 1 - keep.float().mean().item()
        return keep
    return prune


def prune_model(model: nn.Module, sequences: list[list[int]], cfg, log=print) -> tuple[dict[str, Tensor], dict]:
    """Prune `model` in place; returns the keep-masks and the per-weight report."""
    report = {}
    masks = prune_decoder_layers(model, sequences, linear_pruner(cfg, report), log)
    return masks, report


def sparsify_model(model_path: str, out_dir: str, cfg, calibration: list[list[int]], *, masks_path: str,
                   trust_remote_code: bool = False) -> dict:
    """Prune the HF causal LM at `model_path` by `cfg` (a SparsifyStage) on the `calibration` token
    sequences; save it to `out_dir` and its keep-masks to `masks_path`. Returns the stage summary."""
    from transformers import AutoModelForCausalLM

    def log(line: str) -> None:
        print(f"[{cfg.name}] {line}", flush=True)

    start = time.perf_counter()
    device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto", trust_remote_code=trust_remote_code)
    model.to(device).eval()
    log(f"pruning {model_path} ({model.dtype}, {device}) on {len(calibration)} calibration sequences")
    masks, report = prune_model(model, calibration, cfg, log)
    model.save_pretrained(out_dir)
    copy_tokenizer_files(Path(model_path), Path(out_dir))
    save_file(masks, masks_path)
    pruned = sum(int((~keep).sum()) for keep in masks.values())
    total = sum(keep.numel() for keep in masks.values())
    summary = {
        "method": cfg.method + ("+dsnot" if cfg.dsnot is not None else ""),
        "parameters": cfg.model_dump(mode="json", include={"method", "sparsity", "n_m", "dsnot", "calibration"}),
        "sparsity": pruned / total,
        "sparsity_of_all_parameters": pruned / sum(p.numel() for p in model.parameters()),
        "n_m_valid": None if cfg.n_m is None else all(is_n_m(keep, *cfg.n_m) for keep in masks.values()),
        "calibration_sequences": len(calibration),
        "calibration_tokens": sum(len(s) for s in calibration),
        "layers": report,
        "wall_time_s": time.perf_counter() - start,
    }
    log(f"sparsity {summary['sparsity']:.4f} of the decoder Linear weights "
        f"({summary['sparsity_of_all_parameters']:.4f} of all parameters), {summary['wall_time_s']:.1f}s")
    return summary


def run_sparsify_stage(ctx) -> dict:
    cfg, stage_dir = ctx.stage, Path(ctx.stage_dir)
    out_dir, masks_path, stage_json = stage_dir / "model", stage_dir / "masks.safetensors", stage_dir / "stage.json"
    record = {"model": str(out_dir), "masks": str(masks_path), "stage_json": str(stage_json)}
    if ctx.resume and stage_json.exists():
        print(f"[{cfg.name}] already done ({stage_json})", flush=True)
        return record
    sequences, origin = calibration_sequences(ctx.recipe, ctx.inputs, cfg.calibration)
    stage_dir.mkdir(parents=True, exist_ok=True)
    summary = ctx.remote(sparsify_model, str(ctx.input_model()), str(out_dir), cfg, sequences,
                         masks_path=str(masks_path), trust_remote_code=ctx.recipe.model.trust_remote_code)
    write_json_atomic(stage_json, {**summary, "calibration_origin": origin})
    return record
