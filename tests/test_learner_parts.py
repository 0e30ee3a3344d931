"""Learner pieces that need no Ray: dropout off for RL passes."""
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import TINY_POLICY
from rl.learner import disable_dropout


def test_disable_dropout_makes_training_passes_deterministic():
    config = AutoConfig.from_pretrained(TINY_POLICY)
    config.attention_dropout = 0.5
    model = AutoModelForCausalLM.from_pretrained(TINY_POLICY, config=config, attn_implementation="eager").train()
    ids = torch.arange(5, 45).unsqueeze(0)
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, model(ids).logits), "dropout should be active before"
        disable_dropout(model)
        torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
