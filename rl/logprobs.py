"""Per-completion-token log-probs (and entropy) of the sampling policy, with a chunked vocabulary head.

The policy is softmax(logits / T), T the sampling temperature. The plain form runs the whole
causal LM and holds [tokens, vocab] logits for every position of the micro-batch (prompt and
padding included), in float32 for the log-softmax, plus as much again for their gradient: at a
151,936-token vocabulary that is 0.6 MB per token per copy, the largest tensor of a training step.
`completion_logprobs` holds only one chunk of it at a time:

    hidden = base_model output of model(..., use_cache=False, logits_to_keep=[])   # [R, L, H]
    h      = hidden.flat[predict_at[completion_mask]]                               # [m, H], completion tokens only
    for each chunk of `chunk_tokens` rows of h (under activation checkpointing when grad is on):
        logits = head(chunk).float() / T;  logp = logits[target] - logsumexp(logits)
        entropy = logsumexp(logits) - sum(softmax(logits) * logits)                 # no gradient

Checkpointing each chunk (`use_reentrant=False`) keeps only its input [chunk, H] for backward and
recomputes the chunk's logits there, so peak memory grows with `chunk_tokens`, not with the token
count. The head is called as a module, so DeepSpeed ZeRO-3's hooks gather its weight on each call
(the recompute included). The base model's hidden states come from calling the model itself with
`logits_to_keep` = no position (its head sees [R, 0, H]) and a forward hook on the base model:
ZeRO-3 resets its parameter-fetch step only in a forward pre-hook on the root module, which a
direct call of `model.base_model` would skip. For a DeepSpeed engine pass the engine itself, not
`engine.module`: with ZeRO-3 and several micro-batches per step, bypassing the engine's forward
gave wrong gradients for every parameter (tests/test_integration.py catches it). `use_cache=False` matters beyond speed: transformers
confines attention to packed sequences only when no KV cache is passed (see `rl/collate.py`).

Not covered (checked, raises NotImplementedError): families whose causal-LM forward changes the
logits after the head: Gemma 2/3/3n/4 (`final_logit_softcapping`), Cohere/Cohere2 (`logit_scale`),
Granite and GraniteMoE (`logits_scaling`). Also not covered: causal LMs whose forward takes no
`logits_to_keep` (TypeError; every decoder-only family in transformers 5 takes it) or whose base
model returns no `last_hidden_state`. `direct_logprobs` runs the model's own forward and is the
reference in tests and the memory benchmark.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from rl.collate import ModelBatch

_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")  # applied after the head


def completion_logprobs(model, batch: ModelBatch, temperature: float, chunk_tokens: int,
                        with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs [n, W] of the completion tokens (0 on padding), and their entropy [n, W] if asked.

    `model` is the Hugging Face causal LM, or the DeepSpeed engine wrapping it (see the module doc).
    """
    hf_model = getattr(model, "module", model)  # a DeepSpeed engine runs its own forward around the model's
    _check_head(hf_model)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    base, head = hf_model.base_model, hf_model.get_output_embeddings()
    if base is hf_model or head is None:
        raise ValueError(f"{type(hf_model).__name__} has no separate base model and output head")
    # The model itself runs (for its own forward hooks, see the module docstring), with no logits
    # to keep; the base model's final hidden states are taken from a hook.
    captured = []
    handle = base.register_forward_hook(lambda _module, _args, out: captured.append(out.last_hidden_state))
    try:
        model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask,
              use_cache=False, logits_to_keep=batch.input_ids.new_zeros(0), **varlen_kwargs(batch))
    finally:
        handle.remove()
    (hidden,) = captured
    mask = batch.completion_mask
    h = hidden.reshape(-1, hidden.shape[-1])[batch.predict_at[mask]]
    targets = batch.targets[mask]

    logps, entropies = [], []
    for start in range(0, h.shape[0], chunk_tokens):
        args = (head, h[start:start + chunk_tokens], targets[start:start + chunk_tokens], temperature, with_entropy)
        if torch.is_grad_enabled():
            logp, entropy = checkpoint(_head_chunk, *args, use_reentrant=False)
        else:
            logp, entropy = _head_chunk(*args)
        logps.append(logp)
        entropies.append(entropy)

    logp = _to_loss_layout(logps, mask, hidden)
    return logp, (_to_loss_layout(entropies, mask, hidden).detach() if with_entropy else None)


def varlen_kwargs(batch: ModelBatch) -> dict:
    """Sequence starts of a packed batch, under the names flash-attention's varlen path (and
    rl/varlen_attention.py) read; other attention implementations ignore them."""
    if batch.cu_seqlens is None:
        return {}
    longest = int((batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).max())
    return {"cu_seq_lens_q": batch.cu_seqlens, "cu_seq_lens_k": batch.cu_seqlens,
            "max_length_q": longest, "max_length_k": longest}


def direct_logprobs(model, batch: ModelBatch, temperature: float,
                    with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """The plain form: full [R, L, vocab] logits from the model's own forward. Reference only."""
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                   attention_mask=batch.attention_mask, use_cache=False).logits
    logits = logits.reshape(-1, logits.shape[-1])[batch.predict_at].float() / temperature  # [n, W, V]
    logz = torch.logsumexp(logits, dim=-1)
    mask = batch.completion_mask
    logp = (logits.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1) - logz) * mask
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        entropy = (logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)) * mask
    return logp, entropy


def _head_chunk(head, h: Tensor, targets: Tensor, temperature: float, with_entropy: bool):
    logits = head(h).float() / temperature
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        entropy = logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, entropy


def _to_loss_layout(chunks: list[Tensor], mask: Tensor, like: Tensor) -> Tensor:
    out = torch.zeros(mask.shape, dtype=torch.float32, device=like.device)
    return out.masked_scatter(mask, torch.cat(chunks)) if chunks else out


def _check_head(model) -> None:
    config = model.config.get_text_config()
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value is not None and (name == "final_logit_softcapping" or value != 1):
            raise NotImplementedError(
                f"{type(model).__name__} sets {name}={value}: its forward transforms the logits after the output "
                "head, which completion_logprobs does not reproduce")
