"""Padding-free attention without an [L, L] mask: causal SDPA run per packed sequence.

For a packed row (sequences end to end, positions restarting at 0), transformers' sdpa and eager
paths confine attention by building a [1, 1, L, L] mask over the whole row: attention work and
memory grow with the square of the micro-batch's token count, not of each sequence, and on CPU
that made a packed 4,096-token micro-batch ~4x slower than the same rows padded. flash_attention_2
runs a varlen kernel instead, but only on CUDA with flash-attn installed. `varlen_sdpa` is that
idea for any device: it splits the row at the sequence starts (`cu_seq_lens_q`, the same keyword
flash-attention's varlen path takes) and runs causal SDPA on each sequence.

Registered with transformers as attention implementation "prunerl_varlen". Without sequence
starts (a padded batch) it is plain sdpa with the usual mask; its mask function builds no mask
when there is no 2-D attention mask (a packed row). Not for sliding-window attention layers.
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

VARLEN = "prunerl_varlen"


def varlen_sdpa(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float = 0.0,
                scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """query [1, heads, L, d], key/value [1, kv_heads, L, d] -> [1, L, heads, d]."""
    starts = kwargs.get("cu_seq_lens_q")
    if starts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bounds = starts.tolist()
    out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout, scale=scaling, is_causal=True)
        for s, e in zip(bounds[:-1], bounds[1:])], dim=2)
    return out.transpose(1, 2).contiguous(), None


def _mask(*args, attention_mask=None, **kwargs):
    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(VARLEN, varlen_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, _mask)
