"""One learner rank without Ray (as bench/gpu_learner.py runs it): the optimizer starts fresh, its
DeepSpeed checkpoints load with torch's weights-only unpickler, and a non-finite loss stops it
before the optimizer steps."""
import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

SCRIPT = """
import json, math, os, sys, tempfile
os.environ["DS_ACCELERATOR"] = "cpu"
import torch
from launch.schema import ModelConfig, RLStage
from rl.controller import plan_microbatches
from rl.learner import LearnerWorker, NonFiniteError, free_port
from rl.rows import TrainingRow

zero, dtype = int(sys.argv[1]), sys.argv[2]
stage = RLStage.model_validate({"name": "train", "rollout": {"max_new_tokens": 16},
                                "learner": {"zero_stage": zero, "optim": {"lr": 1e-3}}})
worker = LearnerWorker()
worker.setup(0, 1, "127.0.0.1", free_port(), ModelConfig(path="recipes/assets/tiny-qwen2", dtype=dtype),
             stage, 10, 0)
inner = getattr(worker.engine.optimizer, "optimizer", worker.engine.optimizer)
fresh = not inner.state  # no AdamW step taken before the first batch

def train(advantage):
    rows = [TrainingRow([5, 6, 7, 8], [9 + k, 10, 11], None, advantage * (-1) ** k) for k in range(4)]
    per_rank, norm, _ = plan_microbatches(rows, 4, 12, stage.learner, stage.packing)
    return worker.train(per_rank[0], norm)

train(1.0)
folder = tempfile.mkdtemp()
worker.save_checkpoint(folder, "state")
before = {k: v.clone() for k, v in worker.full_state_dict().items()}
train(1.0)
worker.load_checkpoint(folder, "state")  # weights-only unpickler
restored = all(torch.equal(before[k], v) for k, v in worker.full_state_dict().items())
try:
    train(float("nan"))
    error = None
except NonFiniteError as e:
    error = str(e)
unchanged = all(torch.equal(before[k], v) for k, v in worker.full_state_dict().items())
print(json.dumps({"fresh": fresh, "restored": restored, "error": error, "unchanged": unchanged}))
"""


@pytest.mark.parametrize("zero, dtype", [(0, "bfloat16"), (2, "bfloat16")])
def test_checkpoint_loads_weights_only_and_nan_loss_stops(zero, dtype):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(zero), dtype], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["fresh"], "AdamW took a step before training (bias correction a step ahead)"
    assert result["restored"], "the checkpoint did not restore the weights"
    assert result["error"] == "the loss is nan (non-finite: advantages)"
    assert result["unchanged"], "a non-finite loss reached the weights"
