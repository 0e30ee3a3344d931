"""DeepSpeed learner ranks as Ray actors: log-prob passes, the GRPO update, checkpoints, weight export."""
from __future__ import annotations

import math
import os
import socket

import ray
import torch

from rl.aggregation import aggregate
from rl.mismatch import mismatch_weights
from rl.policy_loss import token_loss

STAT_KEYS = ("tokens", "clipped", "entropy", "kl", "policy_loss", "mismatch_kl", "is_weight_mean")


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion rows; per-token arrays are aligned with the targets input_ids[:, 1:]."""
    seqs = [r["prompt_ids"] + r["completion_ids"] for r in rows]
    width = max(len(s) for s in seqs)
    b = len(rows)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    loss_mask = torch.zeros((b, width - 1))
    rollout_logp = torch.zeros((b, width - 1))
    for i, (row, seq) in enumerate(zip(rows, seqs)):
        p, c = len(row["prompt_ids"]), len(row["completion_ids"])
        input_ids[i, :len(seq)] = torch.tensor(seq)
        attention[i, :len(seq)] = 1
        loss_mask[i, p - 1:p - 1 + c] = 0.0 if row.get("masked") else 1.0
        if row.get("rollout_logprobs") is not None:
            rollout_logp[i, p - 1:p - 1 + c] = torch.tensor(row["rollout_logprobs"])
    return {
        "input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask,
        "rollout_logp": rollout_logp,
        "advantages": torch.tensor([r["advantage"] for r in rows], dtype=torch.float32),
        "seq_weights": torch.tensor([r.get("weight", 1.0) for r in rows], dtype=torch.float32),
    }


def token_logprobs(model, batch, temperature: float, with_entropy: bool = False):
    """Per-token log-probs of the targets under softmax(logits / temperature): the sampling policy."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    logits = logits / temperature
    targets = batch["input_ids"][:, 1:]
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        probs = torch.softmax(logits, dim=-1)
        entropy = logz - (probs * logits).sum(-1)
    return logp, entropy


class NormReportingAdamW(torch.optim.AdamW):
    """AdamW that clips and records the global grad norm itself.

    Used without ZeRO, where DeepSpeed clips fp32 gradients but does not report the norm; DeepSpeed
    reads `_global_grad_norm` from the optimizer after each step. Gradients are already reduced
    across ranks when `step` runs.
    """

    def __init__(self, params, max_grad_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self._global_grad_norm = None

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        limit = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        self._global_grad_norm = torch.nn.utils.clip_grad_norm_(params, limit).item()
        return super().step(closure)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class LearnerWorker:
    """One data-parallel rank. The controller calls every method on all ranks at once."""

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a free port: rank 0's become the process group's rendezvous."""
        return ray.util.get_node_ip_address(), free_port()

    def setup(self, rank: int, world_size: int, master_addr: str, master_port: int, model_cfg: dict,
              stage_cfg: dict, total_optimizer_steps: int, seed: int) -> None:
        import deepspeed
        from transformers import AutoModelForCausalLM

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          LOCAL_RANK="0", WORLD_SIZE=str(world_size))
        torch.manual_seed(seed)
        self.rank, self.world_size = rank, world_size
        self.loss_cfg, learner = stage_cfg["loss"], stage_cfg["learner"]
        self.max_new_tokens = stage_cfg["rollout"]["max_new_tokens"]
        self.temperature = stage_cfg["rollout"]["temperature"]
        self.device = torch.device("cuda" if learner["num_gpus_per_rank"] > 0 else "cpu")
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False)
        dtype = getattr(torch, model_cfg["dtype"])
        model = AutoModelForCausalLM.from_pretrained(model_cfg["path"], dtype=dtype,
                                                     trust_remote_code=model_cfg["trust_remote_code"])
        if learner["gradient_checkpointing"]:
            model.gradient_checkpointing_enable()
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        optim = learner["optim"]
        adamw = {"lr": optim["lr"], "betas": tuple(optim["betas"]), "weight_decay": optim["weight_decay"],
                 "eps": optim["eps"]}
        zero = learner["zero_stage"]
        optimizer = (NormReportingAdamW(model.parameters(), optim["grad_clip"], **adamw) if zero == 0
                     else torch.optim.AdamW(model.parameters(), **adamw))
        warmup = int(optim["warmup_ratio"] * total_optimizer_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(optim["schedule"], warmup, total_optimizer_steps))
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            # We own the accumulation boundary: backward() accumulates, step() reduces and updates,
            # however many micro-batches the token budget produced this step.
            "managed_gradient_accumulation": False,
            "gradient_clipping": optim["grad_clip"] if zero > 0 else 0.0,
            "zero_optimization": {"stage": zero},
            "bf16": {"enabled": dtype == torch.bfloat16},
            "fp16": {"enabled": dtype == torch.float16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    lr_scheduler=scheduler, config=ds_config)
        self.ref_model = None
        if self.loss_cfg["kl_coef"] > 0:
            self.ref_model = AutoModelForCausalLM.from_pretrained(
                model_cfg["path"], dtype=dtype, trust_remote_code=model_cfg["trust_remote_code"]
            ).to(self.device).eval().requires_grad_(False)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}

    def _dummy_rows(self) -> list[dict]:
        return [{"prompt_ids": [self.pad_id], "completion_ids": [self.pad_id], "advantage": 0.0,
                 "rollout_logprobs": None}]

    @torch.no_grad()
    def _logprobs(self, model, batches: list[dict]) -> list[torch.Tensor]:
        was_training = model.training
        model.eval()
        out = [token_logprobs(model, b, self.temperature)[0] for b in batches]
        model.train(was_training)
        return out

    def train(self, microbatches: list[list[dict]], norm: dict) -> dict:
        """One batch: `iterations` optimizer steps over these micro-batches (`[]` = a zero-weight pad).

        `norm` holds the GLOBAL counts (all ranks): num_seqs, num_tokens, num_microbatches, so each
        micro-batch's aggregated loss is its exact share of the whole batch's loss.
        """
        real = [bool(mb) for mb in microbatches]
        batches = [self._to_device(collate(mb or self._dummy_rows(), self.pad_id)) for mb in microbatches]
        cfg, mm = self.loss_cfg, self.loss_cfg["mismatch"]
        ref = self._logprobs(self.ref_model, batches) if self.ref_model is not None else [None] * len(batches)
        old = self._logprobs(self.engine.module, batches) if cfg["iterations"] > 1 else [None] * len(batches)
        sums = dict.fromkeys(STAT_KEYS, 0.0)
        grad_norms, lrs = [], []
        self.engine.train()
        for _ in range(cfg["iterations"]):
            lrs.append(self.engine.get_lr()[0])
            for is_real, batch, old_logp, ref_logp in zip(real, batches, old, ref):
                logp, entropy = token_logprobs(self.engine, batch, self.temperature, with_entropy=True)
                old_logp = logp.detach() if old_logp is None else old_logp
                mask = batch["loss_mask"]
                is_w, mm_stats = mismatch_weights(old_logp, batch["rollout_logp"], mask, mode=mm["mode"],
                                                  level=mm["level"], c_min=mm["c_min"], c_max=mm["c_max"])
                per_token, stats = token_loss(
                    logp, old_logp, batch["advantages"], mask, eps_low=cfg["eps_low"],
                    eps_high=cfg["eps_high"], kl_coef=cfg["kl_coef"], ref_logp=ref_logp,
                    is_weights=is_w, seq_weights=batch["seq_weights"])
                loss = aggregate(per_token, mask, cfg["agg"], max_new_tokens=self.max_new_tokens, **norm)
                # DeepSpeed averages gradients over ranks; our shares already sum to the batch loss.
                self.engine.backward(loss * self.world_size * float(is_real))
                if is_real:
                    tokens = mask.sum().item()
                    sums["tokens"] += tokens
                    sums["policy_loss"] += loss.item()
                    sums["clipped"] += (stats["clipped"].float() * mask).sum().item()
                    sums["entropy"] += (entropy * mask).sum().item()
                    if "kl" in stats:
                        sums["kl"] += (stats["kl"] * mask).sum().item()
                    sums["mismatch_kl"] += mm_stats.get("mismatch_kl", 0.0) * tokens
                    sums["is_weight_mean"] += mm_stats.get("is_weight_mean", 1.0) * tokens
            self.engine.step()
            grad_norms.append(float(self.engine.get_global_grad_norm() or 0.0))
        sums = {k: v / cfg["iterations"] for k, v in sums.items()}
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
        _, client = self.engine.load_checkpoint(directory, tag=tag)
        if client and "torch_rng" in client:
            torch.set_rng_state(client["torch_rng"])

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class LearnerGroup:
    """M ranks in a placement group; every call fans out to all ranks and waits for them."""

    def __init__(self, model_cfg: dict, stage_cfg: dict, total_optimizer_steps: int, seed: int):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        learner = stage_cfg["learner"]
        world = learner["ranks"]
        bundle = {"CPU": learner["num_cpus_per_rank"]}
        if learner["num_gpus_per_rank"]:
            bundle["GPU"] = learner["num_gpus_per_rank"]
        self.pg = placement_group([bundle] * world, strategy="PACK")
        ray.get(self.pg.ready())
        env = {"TOKENIZERS_PARALLELISM": "false"}
        if not learner["num_gpus_per_rank"]:
            env["DS_ACCELERATOR"] = "cpu"
        actor = ray.remote(LearnerWorker)
        self.workers = [
            actor.options(num_cpus=learner["num_cpus_per_rank"], num_gpus=learner["num_gpus_per_rank"],
                          runtime_env={"env_vars": env},
                          scheduling_strategy=PlacementGroupSchedulingStrategy(
                              placement_group=self.pg, placement_group_bundle_index=r)
                          ).remote()
            for r in range(world)]
        addr, port = ray.get(self.workers[0].rendezvous.remote())
        self.call("setup", per_rank_args=[(r, world, addr, port, model_cfg, stage_cfg, total_optimizer_steps, seed)
                                          for r in range(world)])

    def call(self, method: str, *args, per_rank_args: list | None = None):
        if per_rank_args is not None:
            refs = [getattr(w, method).remote(*a) for w, a in zip(self.workers, per_rank_args)]
        else:
            refs = [getattr(w, method).remote(*args) for w in self.workers]
        return ray.get(refs)

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        try:
            ray.get([w.shutdown.remote() for w in self.workers], timeout=30)
        finally:
            for w in self.workers:
                ray.kill(w)
            remove_placement_group(self.pg)
