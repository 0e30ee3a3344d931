"""The optimizer side of the learner: AdamW, the LR schedule and the DeepSpeed config."""
from __future__ import annotations

import math

import torch


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


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


def build_optimizer(model, optim, zero_stage: int, total_optimizer_steps: int, offload_optimizer: bool = False):
    """(optimizer, LR scheduler, DeepSpeed config) for an `OptimConfig`."""
    adamw = {"lr": optim.lr, "betas": tuple(optim.betas), "weight_decay": optim.weight_decay, "eps": optim.eps}
    optimizer = (NormReportingAdamW(model.parameters(), optim.grad_clip, **adamw) if zero_stage == 0
                 else torch.optim.AdamW(model.parameters(), **adamw))
    warmup = int(optim.warmup_ratio * total_optimizer_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim.schedule, warmup, total_optimizer_steps))
    dtype = next(model.parameters()).dtype
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # We own the accumulation boundary: backward() accumulates, step() reduces and updates,
        # however many micro-batches the token budget produced this step.
        "managed_gradient_accumulation": False,
        "gradient_clipping": optim.grad_clip if zero_stage > 0 else 0.0,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if offload_optimizer:
        ds_config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        # torch's AdamW steps the offloaded fp32 state; DeepSpeedCPUAdam would be faster but is a
        # compiled op that DS_BUILD_OPS=0 installs do not have.
        ds_config["zero_force_ds_cpu_optimizer"] = False
    return optimizer, scheduler, ds_config
