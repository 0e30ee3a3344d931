"""GPU-only paths: DeepSpeed learner ranks on CUDA with NCCL. Skipped without a GPU."""
import pytest
import torch

from test_integration import rewarded_answer_gains_likelihood

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_learner_step_on_gpu_with_nccl(ray_local, zero_stage):
    ranks = min(2, torch.cuda.device_count())
    stats = rewarded_answer_gains_likelihood(
        {"ranks": ranks, "num_gpus_per_rank": 1, "num_cpus_per_rank": 1, "zero_stage": zero_stage})
    assert stats["grad_norm"] > 0
