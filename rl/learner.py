"""One GRPO learner rank: log-prob passes, the clipped policy-gradient update, weight export to
the rollout engines.

The DeepSpeed side (process group, engine, full weights, checkpoints, Hugging Face export) is the
base class in rl/deepspeed_worker.py; rl/learner_group.py places the ranks as Ray actors. The
pieces `train` runs are elsewhere too: micro-batch tensors in rl/collate.py, the memory-bounded
log-prob head in rl/logprobs.py, the loss in rl/policy_loss.py + rl/aggregation.py, the
rollout-mismatch weights in rl/mismatch.py. This module imports neither Ray nor vLLM, so the
learner step runs on a bare CUDA machine (bench/gpu_learner.py).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from rl.aggregation import aggregate
from rl.collate import ModelBatch, collate
from rl.deepspeed_worker import DeepSpeedWorker, NonFiniteError, load_policy
from rl.deepspeed_worker import disable_dropout, free_port  # noqa: F401 (re-exported for older callers)
from rl.logprobs import completion_logprobs
from rl.mismatch import mismatch_weights
from rl.policy_loss import token_loss
from rl.rows import TrainingRow


@dataclass(frozen=True)
class LossNormaliser:
    """Global counts over the whole optimizer batch (all ranks), see rl/aggregation.py."""
    num_seqs: float
    num_tokens: float
    num_microbatches: int


@dataclass
class TrainStats:
    """What `train` reports, summed over the real micro-batches of one pass: token counts and
    token sums, except `loss` and `policy_loss`, the micro-batches' shares of the batch loss."""
    tokens: float = 0.0
    clipped: float = 0.0
    entropy: float = 0.0
    kl: float = 0.0
    loss: float = 0.0
    policy_loss: float = 0.0
    mismatch_kl: float = 0.0
    is_weight_mean: float = 0.0


def _nonfinite_inputs(logp, old_logp, ref_logp, batch: ModelBatch) -> str:
    named = {"policy log-probs": logp, "old log-probs": old_logp, "reference log-probs": ref_logp,
             "advantages": batch.advantages, "rollout log-probs": batch.rollout_logp}
    bad = [name for name, t in named.items() if t is not None and not torch.isfinite(t).all()]
    return "non-finite: " + ", ".join(bad) if bad else "its inputs are finite"


def _gathered(tensor: torch.Tensor):
    """A ZeRO-3 parameter gathered whole for the duration of the block (collective over the ranks)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters([tensor], enabled=hasattr(tensor, "ds_id"))


class LearnerWorker(DeepSpeedWorker):
    """One data-parallel GRPO rank. The controller calls every method on all ranks at once."""

    def setup(self, rank: int, world_size: int, master_addr: str, master_port: int, model_cfg, stage,
              total_optimizer_steps: int, seed: int) -> None:
        """`stage` is the `launch.schema.RLStage`; `model_cfg` the recipe's `ModelConfig`."""
        learner = stage.learner
        self.init_process_group(rank, world_size, master_addr, master_port, gpu=learner.num_gpus_per_rank > 0)
        torch.manual_seed(seed)
        self.loss, self.learner = stage.loss, learner
        self.max_new_tokens, self.temperature = stage.rollout.max_new_tokens, stage.rollout.temperature
        self.packed = stage.packing.mode == "dense"
        model = load_policy(model_cfg, torch.device("cpu"), self.packed)
        if learner.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        self.init_engine(model, learner.optim, learner.zero_stage, total_optimizer_steps, learner.offload_optimizer)
        self.ref_model = None
        if self.loss.kl_coef > 0:
            self.ref_model = load_policy(model_cfg, self.device, self.packed).eval().requires_grad_(False)

    def _logprobs(self, batch: ModelBatch, model=None, with_entropy: bool = False):
        return completion_logprobs(model if model is not None else self.engine, batch, self.temperature,
                                   self.learner.logprob_chunk_tokens, with_entropy=with_entropy)

    @torch.no_grad()
    def _frozen_logprobs(self, model, batches: list[ModelBatch]) -> list[torch.Tensor]:
        return [self._logprobs(b, model)[0] for b in batches]

    def train(self, microbatches: list[list[TrainingRow]], norm: LossNormaliser) -> dict:
        """One batch: `iterations` optimizer steps over these micro-batches (`[]` = a zero-weight pad).

        `norm` holds the GLOBAL counts (all ranks), so each micro-batch's aggregated loss is its
        exact share of the whole batch's loss.
        """
        pad_row = TrainingRow([self.pad_id], [self.pad_id], None, 0.0)
        real = [bool(mb) for mb in microbatches]
        batches = [collate(mb or [pad_row], self.pad_id, self.packed).to(self.device) for mb in microbatches]
        iterations = self.loss.iterations
        ref = self._frozen_logprobs(self.ref_model, batches) if self.ref_model is not None else [None] * len(batches)
        old = self._frozen_logprobs(self.engine, batches) if iterations > 1 else [None] * len(batches)
        stats = TrainStats()
        grad_norms, lrs = [], []
        self.engine.train()
        for _ in range(iterations):
            lrs.append(self.engine.get_lr()[0])
            for is_real, batch, old_logp, ref_logp in zip(real, batches, old, ref):
                self._microbatch(batch, old_logp, ref_logp, norm, stats if is_real else None)
            self.engine.step()
            grad_norms.append(float(self.engine.get_global_grad_norm() or 0.0))
            if not math.isfinite(grad_norms[-1]):
                raise NonFiniteError(f"the gradient norm is {grad_norms[-1]}")
        means = {k: v / iterations for k, v in asdict(stats).items()}
        return {**means, "grad_norm": sum(grad_norms) / len(grad_norms), "lr": lrs[0]}

    def _microbatch(self, batch: ModelBatch, old_logp, ref_logp, norm: LossNormaliser,
                    stats: TrainStats | None) -> None:
        """Backward of one micro-batch's share of the batch loss, its statistics added to `stats`;
        `stats` None: a zero-weight pad (it runs so that every rank makes the same collective calls)."""
        cfg, mm, counts = self.loss, self.loss.mismatch, asdict(norm)
        logp, entropy = self._logprobs(batch, with_entropy=True)
        old_logp = logp.detach() if old_logp is None else old_logp
        mask = batch.loss_mask
        # A token without an engine log-prob gets mismatch ratio 1.
        rollout_logp = torch.where(batch.has_rollout_logp, batch.rollout_logp, old_logp)
        is_w, mm_stats = mismatch_weights(old_logp, rollout_logp, mask, mode=mm.mode, level=mm.level,
                                          c_min=mm.c_min, c_max=mm.c_max)
        per_token, terms = token_loss(
            logp, old_logp, batch.advantages, mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
            kl_coef=cfg.kl_coef, ref_logp=ref_logp, is_weights=is_w, seq_weights=batch.seq_weights)
        loss = aggregate(per_token, mask, cfg.agg, max_new_tokens=self.max_new_tokens, **counts)
        loss_value = loss.item() if stats is not None else 0.0  # one host sync, also feeds the stats
        if not math.isfinite(loss_value):
            raise NonFiniteError(f"the loss is {loss_value} ({_nonfinite_inputs(logp, old_logp, ref_logp, batch)})")
        # DeepSpeed averages gradients over ranks; our shares already sum to the batch loss.
        self.engine.backward(loss * self.world_size * float(stats is not None))
        if stats is None:
            return
        tokens = mask.sum().item()
        stats.tokens += tokens
        stats.loss += loss_value
        stats.policy_loss += aggregate(terms["policy"], mask, cfg.agg, max_new_tokens=self.max_new_tokens,
                                       **counts).item()
        stats.clipped += (terms["clipped"].float() * mask).sum().item()
        stats.entropy += (entropy * mask).sum().item()
        if "kl" in terms:
            stats.kl += (terms["kl"] * mask).sum().item()
        stats.mismatch_kl += mm_stats.get("mismatch_kl", 0.0) * tokens
        stats.is_weight_mean += mm_stats.get("is_weight_mean", 1.0) * tokens

    def publish_weights(self, transport: str, directory: str, version: int) -> str | None:
        from rollout.weight_sync import TRANSPORTS

        state = self.full_state_dict()
        return TRANSPORTS[transport](directory).publish(state, version) if state is not None else None

    def open_weight_group(self, address: str, port: int, world_size: int, device_type: str, bucket_mb: float,
                          timeout_s: float) -> None:
        """Collective weight sync (rollout/weight_sync.py): rank 0 hosts a group with the engines'
        vLLM workers and posts the bucket plan; every rank keeps the plan (ZeRO-3 gathers need all)."""
        from rollout.weight_sync import WeightGroup, plan_buckets

        self.close_weight_group()
        if device_type != self.device.type:
            raise ValueError(f"collective weight sync: the learners run on {self.device.type}, the engines on "
                             f"{device_type}; use the file transport")
        self.weight_buckets = plan_buckets(
            [(name, getattr(t, "ds_shape", t.shape), t.dtype) for name, t in self._weight_tensors().items()],
            int(bucket_mb * 2**20))
        if self.rank == 0:
            self.weight_group = WeightGroup(address, port, 0, world_size, timeout_s, self.device, address)
            self.weight_group.post_plan(self.weight_buckets)

    def send_weights(self) -> None:
        """Broadcast the weights to the engines, one parameter gathered at a time. Collective."""
        from rollout.weight_sync import send_buckets

        send_buckets(self.weight_buckets, self._weight_tensors(), _gathered, self.weight_group, self.device)

    def close_weight_group(self) -> None:
        if getattr(self, "weight_group", None) is not None:
            self.weight_group.close()
        self.weight_group = None

    def _weight_tensors(self) -> dict[str, torch.Tensor]:
        # The state dict's parameters themselves (partitioned under ZeRO-3), with the tied output
        # head under its own name, as in `full_state_dict`.
        return self.engine.module.state_dict(keep_vars=True)
