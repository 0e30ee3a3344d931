"""One distillation rank: a DeepSpeed student (rl/deepspeed_worker.py) and a frozen teacher copy.

Each step the driver (compress/distill/stage.py) hands every rank its share of the drawn prompts.
The rank completes each prompt (sampled by the teacher, the data's reference text, or sampled by
the student for the on-policy fraction), runs both models over prompt + completion, and steps on
the token mean of the divergence over the completion tokens of ALL ranks (the token count is
all-reduced first). Completions come from transformers' `generate` on the rank itself: the
teacher is already there, and the sequences are short on the machines this runs on; a vLLM
engine would pay off only for long completions.

Pruning masks are kept by zeroing the masked weights once and the masked gradients in every
backward (a hook on each parameter). AdamW's update of a zero weight with zero gradients is
exactly zero, weight decay included, so the weights stay zero in DeepSpeed's fp32 master copy as
well as in the module; multiplying the module weights after each step would not reach that copy.

Learned N:M masks (`learned_nm`) are attached before the engine is built, so the candidate scores
are parameters that AdamW steps with the weights; the schedule advances after every optimizer
step, and `finish_learned_masks` bakes w ⊙ mask into the weights before the student is saved.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from compress.distill.kcd import sequence_values
from compress.distill.losses import token_divergence
from compress.sparsify.learned_nm import LearnedNM
from compress.sparsify.nm import is_n_m
from rl.batching import token_budget_microbatches
from rl.collate import ModelBatch, collate
from rl.deepspeed_worker import DeepSpeedWorker, NonFiniteError, load_policy
from rl.rows import TrainingRow

HELDOUT_STEP = 0  # the seed slot of the held-out samples; train steps count from 1


@dataclass(frozen=True)
class DistillPrompt:
    """A drawn prompt, as the driver hands it to a rank."""
    index: int                        # into the train prompts: KCD's knowledge point
    prompt_ids: list[int]
    reference_ids: list[int] | None   # the completion to train on (`sequences: reference`), else None
    on_policy: bool                   # the student samples the completion


@dataclass(frozen=True)
class StepResult:
    """One rank's share of a step."""
    loss_sum: float                    # Σ of the per-token loss over this rank's completion tokens
    tokens: int
    values: list[tuple[int, float]]    # (prompt index, KCD value of the sequence trained from it)
    grad_norm: float
    lr: float


def completion_logits(model, batch: ModelBatch) -> torch.Tensor:
    """Logits [n, W, V] at the positions that predict each completion token."""
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask,
                   use_cache=False).logits
    return logits.reshape(-1, logits.shape[-1])[batch.predict_at]


@torch.no_grad()
def sample_completions(model, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                       pad_id: int) -> list[list[int]]:
    """One sampled completion per prompt (pure sampling: no top-k/top-p), cut after its EOS."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens, do_sample=True,
                         temperature=temperature, top_k=0, top_p=1.0, pad_token_id=pad_id)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    completions = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        completions.append(row[:end])
    return completions


def keep_masked(model: torch.nn.Module, masks: dict[str, torch.Tensor], device: torch.device) -> None:
    """Zero the weights where `masks` (bool, by parameter name) is False, and their gradients in
    every backward (see the module docstring)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(set(masks) - set(params))
    if unknown:
        raise ValueError(f"the masks name parameters the student does not have: {', '.join(unknown[:5])}")
    for name, mask in masks.items():
        param = params[name]
        if mask.shape != param.shape:
            raise ValueError(f"mask {name}: shape {tuple(mask.shape)}, the parameter's {tuple(param.shape)}")
        keep = mask.to(device=device, dtype=param.dtype)
        with torch.no_grad():
            param.mul_(keep.to(param.device))
        param.register_hook(lambda grad, keep=keep: grad * keep)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The sampling seed of one rank at one step (HELDOUT_STEP: the held-out samples)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


class DistillWorker(DeepSpeedWorker):
    """One data-parallel distillation rank. The driver calls every method on all ranks at once."""

    def setup(self, rank: int, world_size: int, master_addr: str, master_port: int, student_cfg, teacher_cfg,
              cfg, masks_path: str | None, seed: int) -> None:
        """`student_cfg`, `teacher_cfg`: `launch.schema.ModelConfig`; `cfg`: the `DistillStage`."""
        self.init_process_group(rank, world_size, master_addr, master_port, gpu=cfg.num_gpus_per_rank > 0)
        torch.manual_seed(seed)
        self.cfg, self.seed = cfg, seed
        student = load_policy(student_cfg, torch.device("cpu"))
        self.teacher = load_policy(teacher_cfg, self.device).eval().requires_grad_(False)
        if student.config.vocab_size != self.teacher.config.vocab_size:
            raise ValueError(f"the student's vocabulary ({student.config.vocab_size}) differs from the teacher's "
                             f"({self.teacher.config.vocab_size}); distillation compares their distributions")
        if masks_path is not None:
            from safetensors.torch import load_file

            keep_masked(student, load_file(masks_path), self.device)
        self.learned = None
        if cfg.learned_nm is not None:
            self.learned = LearnedNM.attach(student, cfg.learned_nm.n, cfg.learned_nm.m, cfg.learned_steps())
            student.to(student.dtype)  # the scores start in float32: one dtype for DeepSpeed's flat buffers
        self.pad_id = student.config.pad_token_id if student.config.pad_token_id is not None else 0
        self.init_engine(student, cfg.optim, cfg.zero_stage, cfg.steps)
        self.heldout: list[TrainingRow] = []

    def set_heldout(self, prompts: list[list[int]]) -> None:
        """Sample the held-out sequences once: the teacher's, at temperature 1."""
        torch.manual_seed(step_seed(self.seed, HELDOUT_STEP, self.rank))
        completions = sample_completions(self.teacher, prompts, self.cfg.max_new_tokens, 1.0, self.pad_id)
        self.heldout = [TrainingRow(p, c, None, 0.0) for p, c in zip(prompts, completions)]

    @torch.no_grad()
    def heldout_kl(self) -> tuple[float, int]:
        """Σ over the held-out completion tokens of KL(p_T‖p_S) at temperature 1, and their count."""
        self.engine.eval()
        total, tokens = 0.0, 0
        for batch, members in self._lockstep(self.heldout):
            kl = token_divergence(completion_logits(self.engine, batch), completion_logits(self.teacher, batch),
                                  "forward_kl")
            if members:
                total += (kl * batch.loss_mask).sum().item()
                tokens += int(batch.loss_mask.sum().item())
        return total, tokens

    def train_step(self, step: int, work: list[DistillPrompt]) -> StepResult:
        """One optimizer step on the token mean, over all ranks, of the divergence on this step's sequences."""
        rows = self._sequences(step, work)
        cfg = self.cfg
        tokens = sum(len(r.completion_ids) for r in rows)
        global_tokens = max(1, self._all_reduce(tokens, dist.ReduceOp.SUM))
        self.engine.train()
        loss_sum, values = 0.0, []
        for batch, members in self._lockstep(rows):
            real = bool(members)
            student_logits = completion_logits(self.engine, batch)
            with torch.no_grad():
                teacher_logits = completion_logits(self.teacher, batch)
            per_token = token_divergence(student_logits, teacher_logits, cfg.loss, cfg.beta, cfg.temperature)
            mask = batch.loss_mask
            share = (per_token * mask).sum()
            value = share.item() if real else 0.0
            if not math.isfinite(value):
                raise NonFiniteError(f"the distillation loss is {value}")
            # DeepSpeed averages gradients over ranks: scaled back to the sum of every rank's share.
            self.engine.backward(share / global_tokens * self.world_size * float(real))
            if real:
                loss_sum += value
                if cfg.kcd is not None:
                    with torch.no_grad():
                        seq = sequence_values(student_logits, per_token, mask, cfg.kcd.value, cfg.temperature)
                    values += [(work[i].index, v) for i, v in zip(members, seq.tolist())]
        lr = self.engine.get_lr()[0]
        self.engine.step()
        if self.learned is not None:
            self.learned.step(step)
        grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
        if not math.isfinite(grad_norm):
            raise NonFiniteError(f"the gradient norm is {grad_norm}")
        return StepResult(loss_sum, tokens, values, grad_norm, lr)

    def finish_learned_masks(self, path: str) -> dict:
        """End the learned N:M schedule, bake the masks into the student's weights, and (rank 0) save
        the bool keep-masks to `path`; returns the pattern, its validity and the sparsity."""
        from safetensors.torch import save_file

        n, m = self.cfg.learned_nm.n, self.cfg.learned_nm.m
        masks = self.learned.finalize()
        if self.rank == 0:
            save_file(masks, path)
        dropped = sum(int((~keep).sum()) for keep in masks.values())
        return {"n_m": [n, m], "n_m_valid": all(is_n_m(keep, n, m) for keep in masks.values()),
                "weights": len(masks), "sparsity": dropped / sum(keep.numel() for keep in masks.values())}

    def _sequences(self, step: int, work: list[DistillPrompt]) -> list[TrainingRow]:
        """prompt + completion for each drawn prompt, in the order of `work`."""
        cfg = self.cfg
        torch.manual_seed(step_seed(self.seed, step, self.rank))
        by_student = [i for i, w in enumerate(work) if w.on_policy]
        by_teacher = [i for i, w in enumerate(work) if not w.on_policy and w.reference_ids is None]
        completions = {i: w.reference_ids for i, w in enumerate(work) if not w.on_policy and w.reference_ids is not None}
        for model, chosen in ((self.teacher, by_teacher), (self.engine.module, by_student)):
            sampled = sample_completions(model, [work[i].prompt_ids for i in chosen], cfg.max_new_tokens,
                                         cfg.temperature, self.pad_id)
            completions.update(zip(chosen, sampled))
        return [TrainingRow(w.prompt_ids, completions[i], None, 0.0) for i, w in enumerate(work)]

    def _lockstep(self, rows: list[TrainingRow]):
        """(micro-batch, indices of its rows) within the token budget, then pads (no rows) up to the
        most micro-batches any rank has: ZeRO-3 gathers parameters in every forward, a collective."""
        batches = token_budget_microbatches([r.length for r in rows], self.cfg.max_tokens_per_microbatch)
        count = self._all_reduce(len(batches), dist.ReduceOp.MAX)
        pad = [TrainingRow([self.pad_id], [self.pad_id], None, 0.0)]
        for b in range(count):
            members = batches[b] if b < len(batches) else []
            batch = collate([rows[i] for i in members] or pad, self.pad_id, packed=False).to(self.device)
            yield batch, members

    def _all_reduce(self, value: int, op) -> int:
        tensor = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(tensor, op=op)
        return int(tensor.item())
