"""Training rows -> the tensors of one learner micro-batch, padded or packed.

Two tensor layouts share one batch:

- The model layout [R, L]: what the transformer reads. Padded: R = n right-padded rows of
  prompt + completion with an attention mask. Packed (padding-free): R = 1, all sequences end to
  end (L = sum of lengths), position ids restarting at 0 at every sequence start, no attention
  mask; transformers then confines attention to each sequence (see below).
- The loss layout [n, W]: one row per training row, W = longest completion, completion tokens
  only. `predict_at[i, j]` is the flat index (into the R * L positions) of the hidden state that
  predicts completion token j of row i: the position just before it. Prompt tokens never need the
  vocabulary head, and the loss code never sees the model layout.

Packed attention, as read in transformers 5.19 (`masking_utils.py`): with `attention_mask=None`,
`position_ids` given and `past_key_values is None`, `_preprocess_mask_arguments` calls
`find_packed_sequence_indices(position_ids)`, which starts a new sequence wherever the position
does not grow by exactly 1, and `create_causal_mask` ANDs the causal mask with "same sequence"
(`packed_sequence_mask_function`) for every mask interface: sdpa and eager get an explicit
[1, 1, L, L] mask (no `is_causal` shortcut: O(L^2) memory, and sdpa cannot pick its flash kernel),
flex a BlockMask. flash_attention_2 (GPU) is passed no mask: `_flash_attention_forward`
(`modeling_flash_attention_utils.py`) sees, with batch size 1, position ids that restart
(`_is_packed_sequence`) and runs the varlen kernel with `cu_seqlens` cut wherever the position
equals its minimum (`prepare_fa_kwargs_from_position_ids`) - the faster path for packed batches.
Two conditions follow: positions restart at exactly 0 at each sequence start (`collate` does
this), and the model is called with `use_cache=False` - a causal LM whose config has
`use_cache=True` otherwise makes a DynamicCache, and the packed check is skipped, silently
letting attention cross sequences. `tests/test_packing.py` proves the confinement on the tiny
policy for sdpa and eager (packed == padded == each row alone, values and gradients).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from rl.rows import TrainingRow


@dataclass
class ModelBatch:
    input_ids: Tensor                # [R, L] model input (R = 1 when packed)
    position_ids: Tensor             # [R, L] positions, reset to 0 at every sequence start
    attention_mask: Tensor | None    # [R, L] for padded; None when packed (attention confined to each sequence)
    predict_at: Tensor               # [n, W] long: flat index into R*L of the state predicting each completion token
    targets: Tensor                  # [n, W] long: completion token ids (0 on padding)
    completion_mask: Tensor          # [n, W] bool: a real completion token (False only on padding)
    loss_mask: Tensor                # [n, W] float: 1 for tokens in the loss (TrainingRow.loss_token_mask; 0 on padding)
    rollout_logp: Tensor             # [n, W] float: the engine's log-probs (0 where unknown)
    has_rollout_logp: Tensor         # [n, W] bool: False where the log-prob is unknown (inserted tokens) and on padding
    advantages: Tensor               # [n] float32
    seq_weights: Tensor              # [n] float32 (row.weight)
    cu_seqlens: Tensor | None = None  # [n + 1] int32: where each packed sequence starts, then L; None when padded

    @property
    def packed(self) -> bool:
        return self.attention_mask is None

    def to(self, device) -> "ModelBatch":
        return ModelBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                             for f in fields(self)})


def collate(rows: list[TrainingRow], pad_id: int, packed: bool) -> ModelBatch:
    """One micro-batch of rows in the model layout and the loss layout (see the module docstring)."""
    if not rows:
        raise ValueError("collate needs at least one row")
    n, width = len(rows), max(len(r.completion_ids) for r in rows)
    if packed:
        rows_, cols = 1, sum(r.length for r in rows)
    else:
        rows_, cols = n, max(r.length for r in rows)
    input_ids = torch.full((rows_, cols), pad_id, dtype=torch.long)
    position_ids = torch.zeros((rows_, cols), dtype=torch.long)
    attention_mask = None if packed else torch.zeros((rows_, cols), dtype=torch.long)
    predict_at = torch.zeros((n, width), dtype=torch.long)
    targets = torch.zeros((n, width), dtype=torch.long)
    completion_mask = torch.zeros((n, width), dtype=torch.bool)
    rollout_logp = torch.zeros((n, width))
    has_rollout_logp = torch.zeros((n, width), dtype=torch.bool)
    loss_mask = torch.zeros((n, width))

    start = 0  # flat offset of the current sequence in the R*L positions
    for i, row in enumerate(rows):
        p, c = len(row.prompt_ids), len(row.completion_ids)
        if p == 0:
            raise ValueError(f"row {i} has an empty prompt: its first completion token has no predicting position")
        r, col = (0, start) if packed else (i, 0)
        input_ids[r, col:col + p + c] = torch.tensor(row.prompt_ids + row.completion_ids, dtype=torch.long)
        position_ids[r, col:col + p + c] = torch.arange(p + c)
        if attention_mask is not None:
            attention_mask[r, :p + c] = 1
        flat = r * cols + col
        predict_at[i, :c] = torch.arange(flat + p - 1, flat + p - 1 + c)
        targets[i, :c] = torch.tensor(row.completion_ids, dtype=torch.long)
        completion_mask[i, :c] = True
        if row.rollout_logprobs is not None:
            if len(row.rollout_logprobs) != c:
                raise ValueError(f"row {i}: {len(row.rollout_logprobs)} rollout log-probs for {c} completion tokens")
            rollout_logp[i, :c] = torch.tensor([0.0 if x is None else x for x in row.rollout_logprobs])
            has_rollout_logp[i, :c] = torch.tensor([x is not None for x in row.rollout_logprobs])
        if row.inserted is not None and len(row.inserted) != c:
            raise ValueError(f"row {i}: {len(row.inserted)} inserted flags for {c} completion tokens")
        loss_mask[i, :c] = torch.tensor(row.loss_token_mask(), dtype=torch.float32)
        start += p + c

    return ModelBatch(
        input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
        predict_at=predict_at, targets=targets, completion_mask=completion_mask, loss_mask=loss_mask,
        rollout_logp=rollout_logp, has_rollout_logp=has_rollout_logp,
        advantages=torch.tensor([r.advantage for r in rows], dtype=torch.float32),
        seq_weights=torch.tensor([r.weight for r in rows], dtype=torch.float32),
        cu_seqlens=torch.tensor([0, *itertools.accumulate(r.length for r in rows)], dtype=torch.int32)
        if packed else None,
    )
