"""Memory a stage's workers will need: an estimate from the model's shape, for `prunerl plan`.

The parameter count P is exact: the model is built from its config.json on PyTorch's meta device
(no weights read or allocated; tied embeddings counted once). Everything else is an estimate,
each term named. b is the bytes of `model.dtype` (4 float32, 2 bfloat16/float16), N the
worker's ranks, z its ZeRO stage, T its micro-batch token budget, h/L/V hidden size, decoder
layers and vocabulary of the model:

    learner rank (rl, distill)
        weights       P·b            / N when z = 3
        gradients     P·b            / N when z ≥ 2
        AdamW         P·k            / N when z ≥ 1   k = 12 (fp32 master copy + 2 moments) for
                                                      16-bit weights, 8 (2 moments) for float32:
                                                      the ZeRO paper's accounting; host memory
                                                      when offload_optimizer
        reference     P·b            rl with loss.kl_coef > 0 (a frozen copy on every rank)
        teacher       P_teacher·b    distill (a frozen copy on every rank)
        activations   T·L·34·h·b/2   stored for backward (Korthikanti et al. 2022, attention
                                     scores not stored); with gradient_checkpointing
                                     T·L·h·b (each layer's input) + T·34·h·b/2 (one layer)
        logits        c·V·4·2        rl: fp32 logits and their gradient of one chunk of
                                     c = min(logprob_chunk_tokens, T) tokens;
                      T·V·4·3        distill: student logits, their gradient, teacher logits
    vLLM engine (rl rollout, eval)
        on GPU        gpu_memory_utilization × the GPU's memory (vLLM reserves that fraction for
                      weights + KV cache; eval engines use EngineSpec's default)
        on CPU        P·b + cpu_kvcache_gib (VLLM_CPU_KVCACHE_SPACE)
        eval also loads the model in transformers after the engine for perplexity:
                      weights + the larger of (KV cache, one window's fp32 logits)
    one-worker compression stage (sparsify, quantize)
        weights       P·b
        calibration   samples·max_tokens·h·b·2 (one layer's inputs and outputs; not rtn)
        Hessians      Σ in_features²·4 over one decoder layer's Linear layers (GPTQ only)

Host memory of a worker (what a Kubernetes pod must hold): RUNTIME_BYTES for the process plus,
on CPU, all of the above; on GPU, the weights once (loading passes through host memory) and the
offloaded AdamW state.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Host memory of a worker process before any model: Python with torch (and vLLM) imported; on a GPU
# worker also the CUDA libraries and their host-side buffers. Rough figures.
RUNTIME_BYTES = {"CPU": 1 * GIB, "GPU": 4 * GIB}
ACTIVATION_VALUES_PER_TOKEN_LAYER = 34 / 2  # × h values, × b bytes (Korthikanti et al. 2022)


@dataclass(frozen=True)
class ModelShape:
    parameters: int
    hidden: int
    layers: int
    vocab: int
    kv_values_per_token: int  # 2 (K and V) × layers × KV heads × head dim
    hessian_values: int  # Σ in_features² over one decoder layer's Linear layers


@dataclass(frozen=True)
class Estimate:
    """One worker's memory: `terms` (what, bytes) add up to `total`, on `device`; `host` is the
    host memory of its process."""
    device: str  # "GPU" or "CPU"
    terms: tuple[tuple[str, int], ...]
    host: int

    @property
    def total(self) -> int:
        return sum(b for _, b in self.terms)

    def as_dict(self) -> dict:
        return {"device": self.device, "total_bytes": self.total, "host_bytes": self.host,
                "terms": [{"what": what, "bytes": b} for what, b in self.terms]}


@functools.lru_cache(maxsize=None)
def model_shape(path: str, trust_remote_code: bool = False) -> ModelShape | str:
    """The shape of the causal LM at `path` (a folder or a hub name: config.json only), or why
    it cannot be read."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
        except OSError:  # not cached: one download of config.json (fails fast with HF_HUB_OFFLINE=1)
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any reason the config cannot be read is reported, not raised
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"config.json of {path} unreadable: {reason}"
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    layers = next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == text.num_hidden_layers),
                  None)
    first_layer = layers[0].modules() if layers is not None else []
    return ModelShape(parameters=sum(p.numel() for p in model.parameters()), hidden=text.hidden_size,
                      layers=text.num_hidden_layers, vocab=text.vocab_size,
                      kv_values_per_token=2 * text.num_hidden_layers * kv_heads * head_dim,
                      hessian_values=sum(m.in_features ** 2 for m in first_layer if isinstance(m, nn.Linear)))


def _split(bytes_: float, ranks: int, partitioned: bool) -> int:
    return int(bytes_ / ranks) if partitioned else int(bytes_)


def trainer(shape: ModelShape, b: int, ranks: int, zero: int, tokens: int, on_gpu: bool, offload: bool,
            checkpointing: bool, frozen: tuple[tuple[str, int], ...], logits: tuple[str, int]) -> Estimate:
    """A DeepSpeed rank: its share of weights, gradients and AdamW, frozen copies, activations."""
    P, h, L = shape.parameters, shape.hidden, shape.layers
    per_layer = ACTIVATION_VALUES_PER_TOKEN_LAYER * h * b
    adamw = _split(P * (12 if b == 2 else 8), ranks, zero >= 1)
    activations = (tokens * L * h * b + tokens * per_layer) if checkpointing else tokens * L * per_layer
    terms = [(f"weights P·b{' / N (ZeRO-3)' if zero == 3 else ''}", _split(P * b, ranks, zero == 3)),
             (f"gradients P·b{' / N (ZeRO-2/3)' if zero >= 2 else ''}", _split(P * b, ranks, zero >= 2)),
             *([] if offload else [(f"AdamW P·{12 if b == 2 else 8}{' / N (ZeRO-1+)' if zero >= 1 else ''}", adamw)]),
             *frozen,
             (f"activations of {tokens} tokens{' (checkpointed)' if checkpointing else ''}", int(activations)),
             logits]
    weights = P * b
    host = (RUNTIME_BYTES["GPU" if on_gpu else "CPU"] + (adamw if offload else 0)
            + (weights if on_gpu else sum(t for _, t in terms)))
    return Estimate("GPU" if on_gpu else "CPU", tuple(terms), int(host))


def engine(shape: ModelShape, b: int, gpus: float, cpu_kvcache_gib: int, gpu_memory_utilization: float,
           gpu_memory_gib: float, extra: tuple[str, int] | None = None) -> Estimate:
    """A vLLM engine; `extra` is work after it in the same worker that may need more than its KV cache."""
    weights = shape.parameters * b
    if gpus:
        reserved = int(gpu_memory_utilization * gpu_memory_gib * GIB)
        return Estimate("GPU", ((f"gpu_memory_utilization {gpu_memory_utilization:g} × {gpu_memory_gib:g} GiB GPU "
                                 f"(weights {weights / GIB:.2f} GiB + KV cache)", reserved),),
                        RUNTIME_BYTES["GPU"] + weights)
    kv = cpu_kvcache_gib * GIB
    kv_term = (f"KV cache {cpu_kvcache_gib} GiB (≈{kv // max(1, shape.kv_values_per_token * b):,} tokens)", kv)
    if extra is not None and extra[1] > kv:
        kv_term = extra
    terms = (("weights P·b", weights), kv_term)
    return Estimate("CPU", terms, RUNTIME_BYTES["CPU"] + sum(t for _, t in terms))


def one_worker(shape: ModelShape, b: int, on_gpu: bool, calibration, gptq: bool) -> Estimate:
    """A sparsify or quantize worker; `calibration` None for methods without calibration (rtn)."""
    terms = [("weights P·b", shape.parameters * b)]
    if calibration is not None:
        samples, max_tokens = calibration.samples, calibration.max_tokens
        terms.append((f"calibration {samples}×{max_tokens} tokens, one layer's inputs and outputs",
                      samples * max_tokens * shape.hidden * b * 2))
    if gptq:
        terms.append(("GPTQ Hessians of one decoder layer", shape.hessian_values * 4))
    total = sum(t for _, t in terms)
    device = "GPU" if on_gpu else "CPU"
    return Estimate(device, tuple(terms), RUNTIME_BYTES[device] + (terms[0][1] if on_gpu else total))


def stage_estimates(recipe, stage, gpu_memory_gib: float) -> dict[str, Estimate | str]:
    """{worker group: one worker's Estimate, or why there is none} for a stage of the recipe."""
    from rollout.worker import EngineSpec

    shape = model_shape(recipe.model.path, recipe.model.trust_remote_code)
    if isinstance(shape, str):
        return {w.group: shape for w in stage.workers()}
    b = DTYPE_BYTES[recipe.model.dtype]
    if stage.kind == "rl":
        learner, rollout = stage.learner, stage.rollout
        frozen = (("reference copy P·b (loss.kl_coef > 0)", shape.parameters * b),) if stage.loss.kl_coef > 0 else ()
        chunk = min(learner.logprob_chunk_tokens, learner.max_tokens_per_microbatch)
        return {"learner": trainer(shape, b, learner.ranks, learner.zero_stage, learner.max_tokens_per_microbatch,
                                   learner.num_gpus_per_rank > 0, learner.offload_optimizer,
                                   learner.gradient_checkpointing, frozen,
                                   (f"fp32 logits + grad of {chunk} tokens", chunk * shape.vocab * 4 * 2)),
                "rollout": engine(shape, b, rollout.num_gpus_per_engine, rollout.cpu_kvcache_gib,
                                  rollout.gpu_memory_utilization, gpu_memory_gib)}
    if stage.kind == "distill":
        teacher = shape
        if stage.teacher is not None and stage.teacher not in stage.needs:
            teacher = model_shape(stage.teacher, recipe.model.trust_remote_code)
            if isinstance(teacher, str):
                return {"learner": teacher}
        tokens = stage.max_tokens_per_microbatch
        return {"learner": trainer(shape, b, stage.ranks, stage.zero_stage, tokens, stage.num_gpus_per_rank > 0,
                                   False, False, (("teacher copy P_teacher·b", teacher.parameters * b),),
                                   (f"fp32 student logits + grad + teacher logits of {tokens} tokens",
                                    tokens * shape.vocab * 4 * 3))}
    if stage.kind == "eval":
        window = stage.perplexity_window
        default_utilization = EngineSpec.__dataclass_fields__["gpu_memory_utilization"].default
        return {"main": engine(shape, b, stage.num_gpus, stage.cpu_kvcache_gib, default_utilization, gpu_memory_gib,
                               extra=(f"perplexity: fp32 logits of a {window}-token window", window * shape.vocab * 4))}
    if stage.kind in ("sparsify", "quantize"):
        gptq = stage.kind == "quantize" and stage.method in ("gptq", "smoothquant_gptq")
        calibrated = stage.kind == "sparsify" or stage.method != "rtn"
        return {"main": one_worker(shape, b, stage.num_gpus > 0, stage.calibration if calibrated else None, gptq)}
    return {w.group: f"no memory estimate for stage kind {stage.kind!r}" for w in stage.workers()}
