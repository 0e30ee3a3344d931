"""What every DeepSpeed training rank shares: the process group, the engine (model, AdamW, LR
schedule, ZeRO config from rl/optim.py), the full weights, the Hugging Face export and checkpoints.

A rank is a plain object: rl/learner_group.py (GRPO, rl/learner.py) and compress/distill/stage.py
(distillation, compress/distill/worker.py) place ranks as Ray actors, bench/gpu_learner.py and the
tests run one in-process. Only the two calls that ask Ray about the node import it; nothing here
imports vLLM.
"""
from __future__ import annotations

import os
import socket

import torch

from rl.optim import build_optimizer
from rl.varlen_attention import VARLEN


class NonFiniteError(RuntimeError):
    """A loss or gradient norm that is NaN or infinite: stepping on it would destroy the model."""


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def disable_dropout(model: torch.nn.Module) -> None:
    """Training losses compare distributions of the same tokens across passes: dropout would make them noise."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def load_policy(model_cfg, device: torch.device, packed: bool = False):
    """A causal LM (`launch.schema.ModelConfig`) with dropout off; packed micro-batches run
    attention per sequence."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_cfg.path, dtype=getattr(torch, model_cfg.dtype),
                                                 trust_remote_code=model_cfg.trust_remote_code,
                                                 **({"attn_implementation": VARLEN} if packed else {}))
    disable_dropout(model)
    return model.to(device)


def load_weights_only(path, map_location=None):
    """torch.load with the restricted unpickler, allowing the few plain DeepSpeed classes that
    its ZeRO checkpoints hold besides tensors (loss scaler, ZeRO stage enum, fragment addresses)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


class DeepSpeedWorker:
    """One data-parallel rank. Subclasses call `init_process_group`, then `init_engine`, in their
    `setup`; every method marked collective must be called on all ranks at once."""

    rank: int
    world_size: int
    device: torch.device
    engine: object  # deepspeed.DeepSpeedEngine

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def rendezvous(self, loopback: bool) -> tuple[str, int]:
        """An address of this node and a free port: rank 0's become the process group's rendezvous.
        `loopback` (all ranks on one node) keeps the process group off the network."""
        import ray

        address = "127.0.0.1" if loopback else ray.util.get_node_ip_address()
        return address, free_port(address)

    def init_process_group(self, rank: int, world_size: int, master_addr: str, master_port: int, gpu: bool) -> None:
        """Join the ranks' process group: NCCL on GPUs, gloo on CPUs (with DS_ACCELERATOR=cpu)."""
        import deepspeed

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          LOCAL_RANK="0", WORLD_SIZE=str(world_size))
        if master_addr.startswith("127."):  # a local run: gloo's connections stay on loopback too
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        self.rank, self.world_size = rank, world_size
        self.device = torch.device("cuda" if gpu else "cpu")
        deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo", auto_mpi_discovery=False)

    def init_engine(self, model: torch.nn.Module, optim, zero_stage: int, total_optimizer_steps: int,
                    offload_optimizer: bool = False) -> None:
        """The DeepSpeed engine around `model`, with AdamW and the LR schedule of `optim`
        (`launch.schema.OptimConfig`)."""
        import deepspeed

        optimizer, scheduler, ds_config = build_optimizer(model, optim, zero_stage, total_optimizer_steps,
                                                          offload_optimizer)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds_config)
        # Without ZeRO, DeepSpeed's bf16/fp16 wrapper takes one AdamW step on zero gradients while it
        # initialises: AdamW's bias correction would then run a step ahead (the first update 0.74x).
        if zero_stage == 0 and optimizer.state:
            optimizer.state.clear()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full (gathered) weights on rank 0, None elsewhere. Collective."""
        import deepspeed

        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.engine.zero_optimization_stage() == 3):
            if self.rank != 0:
                return None
            # Tied embeddings keep `lm_head.weight` as its own entry: vLLM's CPU backend holds a
            # separate copy of the output head that a reload of the embedding alone leaves stale.
            return {k: v.detach().cpu().clone() for k, v in self.engine.module.state_dict().items()}

    def save_hf(self, directory: str, tokenizer_path: str) -> None:
        """A Hugging Face folder (safetensors + config + tokenizer) loadable by vLLM and transformers. Collective."""
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
