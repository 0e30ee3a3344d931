"""One DeepSpeed learner rank: log-prob passes, the GRPO update, checkpoints, weight export.

This module imports neither Ray nor vLLM, so the learner step runs on a bare CUDA machine
(bench/gpu_learner.py); rl/learner_group.py places the ranks as Ray actors.

The pieces it runs are elsewhere: micro-batch tensors in rl/collate.py, the memory-bounded
log-prob head in rl/logprobs.py, the loss in rl/policy_loss.py + rl/aggregation.py, the optimizer
and its DeepSpeed config in rl/optim.py.
"""
from __future__ import annotations

import math
import os
import socket
from dataclasses import asdict, dataclass

import torch

from rl.aggregation import aggregate
from rl.collate import collate
from rl.logprobs import completion_logprobs
from rl.mismatch import mismatch_weights
from rl.optim import build_optimizer
from rl.policy_loss import token_loss
from rl.rows import TrainingRow
from rl.varlen_attention import VARLEN

class NonFiniteError(RuntimeError):
    """A loss or gradient norm that is NaN or infinite: stepping on it would destroy the policy."""


STAT_KEYS = ("tokens", "clipped", "entropy", "kl", "loss", "policy_loss", "mismatch_kl", "is_weight_mean")


@dataclass(frozen=True)
class LossNormaliser:
    """Global counts over the whole optimizer batch (all ranks), see rl/aggregation.py."""
    num_seqs: float
    num_tokens: float
    num_microbatches: int


def disable_dropout(model: torch.nn.Module) -> None:
    """RL losses compare log-probs of the same tokens across passes: dropout would make them noise."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _nonfinite_inputs(logp, old_logp, ref_logp, batch) -> str:
    named = {"policy log-probs": logp, "old log-probs": old_logp, "reference log-probs": ref_logp,
             "advantages": batch.advantages, "rollout log-probs": batch.rollout_logp}
    bad = [name for name, t in named.items() if t is not None and not torch.isfinite(t).all()]
    return "non-finite: " + ", ".join(bad) if bad else "its inputs are finite"


def load_weights_only(path, map_location=None):
    """torch.load with the restricted unpickler, allowing the few plain DeepSpeed classes that
    its ZeRO checkpoints hold besides tensors (loss scaler, ZeRO stage enum, fragment addresses)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def load_policy(model_cfg, device: torch.device, packed: bool):
    """The policy (or reference) for learner passes; packed micro-batches run attention per sequence."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_cfg.path, dtype=getattr(torch, model_cfg.dtype),
                                                 trust_remote_code=model_cfg.trust_remote_code,
                                                 **({"attn_implementation": VARLEN} if packed else {}))
    disable_dropout(model)
    return model.to(device)


def _gathered(tensor: torch.Tensor):
    """A ZeRO-3 parameter gathered whole for the duration of the block (collective over the ranks)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters([tensor], enabled=hasattr(tensor, "ds_id"))


class LearnerWorker:
    """One data-parallel rank. The controller calls every method on all ranks at once."""

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def rendezvous(self, loopback: bool) -> tuple[str, int]:
        """An address of this node and a free port: rank 0's become the process group's rendezvous.
        `loopback` (all ranks on one node) keeps the process group off the network."""
        import ray

        address = "127.0.0.1" if loopback else ray.util.get_node_ip_address()
        return address, free_port(address)

    def setup(self, rank: int, world_size: int, master_addr: str, master_port: int, model_cfg, stage,
              total_optimizer_steps: int, seed: int) -> None:
        import deepspeed

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          LOCAL_RANK="0", WORLD_SIZE=str(world_size))
        if master_addr.startswith("127."):  # a local run: gloo's connections stay on loopback too
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.manual_seed(seed)
        self.rank, self.world_size = rank, world_size
        self.loss, self.learner = stage.loss, stage.learner
        self.max_new_tokens, self.temperature = stage.rollout.max_new_tokens, stage.rollout.temperature
        self.packed = stage.packing.mode == "dense"
        self.device = torch.device("cuda" if self.learner.num_gpus_per_rank > 0 else "cpu")
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False)
        model = load_policy(model_cfg, torch.device("cpu"), self.packed)
        if self.learner.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        optimizer, scheduler, ds_config = build_optimizer(model, self.learner.optim, self.learner.zero_stage,
                                                          total_optimizer_steps, self.learner.offload_optimizer)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds_config)
        # Without ZeRO, DeepSpeed's bf16/fp16 wrapper takes one AdamW step on zero gradients while it
        # initialises: AdamW's bias correction would then run a step ahead (the first update 0.74x).
        if self.learner.zero_stage == 0 and optimizer.state:
            optimizer.state.clear()
        self.ref_model = None
        if self.loss.kl_coef > 0:
            self.ref_model = load_policy(model_cfg, self.device, self.packed).eval().requires_grad_(False)

    def _logprobs(self, batch, model=None, with_entropy: bool = False):
        return completion_logprobs(model if model is not None else self.engine, batch, self.temperature,
                                   self.learner.logprob_chunk_tokens, with_entropy=with_entropy)

    @torch.no_grad()
    def _frozen_logprobs(self, model, batches) -> list[torch.Tensor]:
        return [self._logprobs(b, model)[0] for b in batches]

    def train(self, microbatches: list[list[TrainingRow]], norm: LossNormaliser) -> dict:
        """One batch: `iterations` optimizer steps over these micro-batches (`[]` = a zero-weight pad).

        `norm` holds the GLOBAL counts (all ranks), so each micro-batch's aggregated loss is its
        exact share of the whole batch's loss.
        """
        pad_row = TrainingRow([self.pad_id], [self.pad_id], None, 0.0)
        real = [bool(mb) for mb in microbatches]
        batches = [collate(mb or [pad_row], self.pad_id, self.packed).to(self.device) for mb in microbatches]
        cfg, mm, counts = self.loss, self.loss.mismatch, asdict(norm)
        ref = self._frozen_logprobs(self.ref_model, batches) if self.ref_model is not None else [None] * len(batches)
        old = self._frozen_logprobs(self.engine, batches) if cfg.iterations > 1 else [None] * len(batches)
        sums = dict.fromkeys(STAT_KEYS, 0.0)
        grad_norms, lrs = [], []
        self.engine.train()
        for _ in range(cfg.iterations):
            lrs.append(self.engine.get_lr()[0])
            for is_real, batch, old_logp, ref_logp in zip(real, batches, old, ref):
                logp, entropy = self._logprobs(batch, with_entropy=True)
                old_logp = logp.detach() if old_logp is None else old_logp
                mask = batch.loss_mask
                # A token without an engine log-prob gets mismatch ratio 1.
                rollout_logp = torch.where(batch.has_rollout_logp, batch.rollout_logp, old_logp)
                is_w, mm_stats = mismatch_weights(old_logp, rollout_logp, mask, mode=mm.mode, level=mm.level,
                                                  c_min=mm.c_min, c_max=mm.c_max)
                per_token, stats = token_loss(
                    logp, old_logp, batch.advantages, mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                    kl_coef=cfg.kl_coef, ref_logp=ref_logp, is_weights=is_w, seq_weights=batch.seq_weights)
                loss = aggregate(per_token, mask, cfg.agg, max_new_tokens=self.max_new_tokens, **counts)
                loss_value = loss.item() if is_real else 0.0  # one host sync, also feeds the stats
                if not math.isfinite(loss_value):
                    raise NonFiniteError(f"the loss is {loss_value} "
                                         f"({_nonfinite_inputs(logp, old_logp, ref_logp, batch)})")
                # DeepSpeed averages gradients over ranks; our shares already sum to the batch loss.
                self.engine.backward(loss * self.world_size * float(is_real))
                if is_real:
                    tokens = mask.sum().item()
                    sums["tokens"] += tokens
                    sums["loss"] += loss_value
                    sums["policy_loss"] += aggregate(stats["policy"], mask, cfg.agg, max_new_tokens=self.max_new_tokens,
                                                     **counts).item()
                    sums["clipped"] += (stats["clipped"].float() * mask).sum().item()
                    sums["entropy"] += (entropy * mask).sum().item()
                    if "kl" in stats:
                        sums["kl"] += (stats["kl"] * mask).sum().item()
                    sums["mismatch_kl"] += mm_stats.get("mismatch_kl", 0.0) * tokens
                    sums["is_weight_mean"] += mm_stats.get("is_weight_mean", 1.0) * tokens
            self.engine.step()
            grad_norms.append(float(self.engine.get_global_grad_norm() or 0.0))
            if not math.isfinite(grad_norms[-1]):
                raise NonFiniteError(f"the gradient norm is {grad_norms[-1]}")
        sums = {k: v / cfg.iterations for k, v in sums.items()}
        return {**sums, "grad_norm": sum(grad_norms) / len(grad_norms), "lr": lrs[0]}

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full (gathered) weights on rank 0, None elsewhere. Collective: call on every rank."""
        import deepspeed

        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.engine.zero_optimization_stage() == 3):
            if self.rank != 0:
                return None
            # Tied embeddings keep `lm_head.weight` as its own entry: vLLM's CPU backend holds a
            # separate copy of the output head that a reload of the embedding alone leaves stale.
            return {k: v.detach().cpu().clone() for k, v in self.engine.module.state_dict().items()}

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
        """Broadcast the weights to the engines, one parameter gathered at a time. Collective: call on
        every rank."""
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

    def save_hf(self, directory: str, tokenizer_path: str) -> None:
        """A Hugging Face folder (safetensors + config + tokenizer) loadable by vLLM and transformers."""
        state = self.full_state_dict()
        if state is None:
            return
        from transformers import AutoTokenizer

        self.engine.module.save_pretrained(directory, state_dict=state, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(directory)

    def save_checkpoint(self, directory: str, tag: str) -> None:
        self.engine.save_checkpoint(directory, tag=tag, client_state={"torch_rng": torch.get_rng_state()})

    def load_checkpoint(self, directory: str, tag: str) -> None:
        # DeepSpeed unpickles its checkpoint files in full; ours hold only tensors and plain
        # containers, so they load with torch's restricted (weights-only) unpickler instead.
        self.engine.checkpoint_engine.load = load_weights_only
        _, client = self.engine.load_checkpoint(directory, tag=tag)
        if client and "torch_rng" in client:
            torch.set_rng_state(client["torch_rng"])

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
