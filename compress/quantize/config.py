"""The quantize stage's recipe section."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from compress.calibration import CalibrationConfig
from launch.schema_base import OneWorkerStage, Strict

Scheme = Literal["W4A16", "W4A16_ASYM", "W8A16", "W8A8", "FP8_DYNAMIC", "W8A16_FP8"]
LLMCOMPRESSOR_METHODS = ("gptq", "smoothquant_gptq")
INT_SCHEMES = ("W4A16", "W4A16_ASYM", "W8A16", "W8A8")


class MixedConfig(Strict):
    """Squeeze10-style mixed 1-bit/4-bit: our reconstruction of an unreleased method. Stored bits per
    weight: 1.6 of payload at keep_fraction 0.2 (the paper's figure), plus 1 for the bitmap of the
    4-bit weights and 48 / group width for fp16 scales: 2.6 + 48/g."""
    keep_fraction: float = Field(0.2, ge=0, le=1, description="Share of each row (or group) kept at 4 bits, chosen "
                                                               "by `selection`; the rest is binarised.")
    group_size: int = Field(0, ge=0, description="Input columns per selection group, each with its own binary "
                                                 "scale and 4-bit grid; 0: the whole row.")
    selection: Literal["pbar", "magnitude", "random"] = Field(
        "pbar", description="Which weights keep 4 bits: `pbar` the highest |w − α·sign(w)|·‖X_j‖₂ (the output "
                            "change binarising them causes), `magnitude` the largest |w|, `random` (baselines).")
    fias: bool = Field(True, description="Calibrate against full-precision activations (FIAS): PBAR's input norms "
                                         "come from the full-precision model, and binary scales are fitted so each "
                                         "layer's output on the quantized model's inputs matches the full-precision "
                                         "output. False: statistics of the already-quantized model only.")
    seed: int = Field(0, ge=0, description="Seed of `selection: random`.")


class LLMCompressorConfig(Strict):
    pip: list[str] = Field(["llmcompressor==0.14.0.1"], min_length=1,
                           description="Requirements of the Ray pip environment llm-compressor runs in (its pins of "
                                       "compressed-tensors and transformers clash with vLLM's, so it gets its own).")
    dampening_frac: float = Field(0.01, gt=0, description="GPTQ: damping added to the Hessian diagonal, as a "
                                                          "fraction of its mean.")
    block_size: int = Field(128, ge=1, description="GPTQ: columns quantized per block.")
    smoothing_strength: float = Field(0.8, gt=0, lt=1, description="SmoothQuant's migration strength α.")


class QuantizeStage(OneWorkerStage):
    """Quantize the decoder's Linear layers: round-to-nearest through compressed-tensors, GPTQ or
    SmoothQuant+GPTQ through llm-compressor, or the Squeeze10-style mixed 1-bit/4-bit
    reconstruction (fake-quant)."""
    kind: Literal["quantize"] = "quantize"
    method: Literal["rtn", "gptq", "smoothquant_gptq", "mixed_1bit_4bit"] = Field(
        "rtn", description="`rtn`: round-to-nearest min-max scales, in process (compressed-tensors); `gptq`, "
                           "`smoothquant_gptq`: llm-compressor in its own Ray pip environment (`llmcompressor`); "
                           "all three write a compressed-tensors checkpoint that transformers loads and vLLM "
                           "serves. `mixed_1bit_4bit`: Squeeze10-style mixed precision (our reconstruction of "
                           "an unreleased method, `mixed`), stored fake-quantized: dequantized weights plus "
                           "a sidecar describing the packed layout (quantization_layout.json).")
    scheme: Scheme = Field(
        "W4A16", description="compressed-tensors scheme (rtn, gptq): W4A16 / W4A16_ASYM / W8A16 int weights "
                             "in `group_size` groups; W8A8 int8 per-channel weights with dynamic per-token int8 "
                             "activations (smoothquant_gptq needs it); FP8_DYNAMIC FP8 per-channel weights with "
                             "dynamic per-token FP8 activations; W8A16_FP8 FP8 per-channel weights only.")
    group_size: int = Field(128, ge=0, description="Input columns sharing a scale for W4A16, W4A16_ASYM and "
                                                   "W8A16; 0: one scale per output channel.")
    ignore: list[str] = Field(["lm_head"], description="Linear layers left unquantized: names, or `re:` regexes "
                                                       "(compressed-tensors target syntax).")
    mixed: MixedConfig = Field(MixedConfig(), description="Settings of method mixed_1bit_4bit.")
    llmcompressor: LLMCompressorConfig = Field(LLMCompressorConfig(), description="Settings of methods gptq "
                                                                                  "and smoothquant_gptq.")
    calibration: CalibrationConfig = Field(CalibrationConfig(), description="Calibration sequences (all methods "
                                                                            "but rtn).")

    @model_validator(mode="after")
    def _scheme_fits_method(self):
        if self.method == "smoothquant_gptq" and self.scheme != "W8A8":
            raise ValueError(f"smoothquant_gptq quantizes activations: it needs scheme W8A8, not {self.scheme}")
        if self.method == "gptq" and self.scheme not in INT_SCHEMES:
            raise ValueError(f"gptq needs an int scheme ({', '.join(INT_SCHEMES)}); for {self.scheme} use rtn")
        return self
