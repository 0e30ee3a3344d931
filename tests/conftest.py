import logging
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_POLICY = REPO / "recipes" / "assets" / "tiny-qwen2"
SYNTH_DATA = REPO / "recipes" / "assets" / "synth_gsm8k"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the in-process integration tests (CLI tests start their own)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()
