"""Step-GRPO's dynamic truncated rollout on a real vLLM CPU engine with the testbed think policy
(recipes/assets/tiny-qwen2-think, whose traces hold redundant "Wait, let me check" steps)."""
from __future__ import annotations

import json
import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO
from launch.schema import LivenessConfig, TruncationConfig
from rl.step_reward import count_steps
from rollout.truncation import EXIT_REASONS, Truncation
from rollout.weight_sync import FileTransport
from rollout.worker import EngineSpec, RolloutGroup, Sampling

THINK_POLICY = REPO / "recipes" / "assets" / "tiny-qwen2-think"
EVAL = REPO / "recipes" / "assets" / "synth_think" / "eval.jsonl"
MAX_NEW = 192


def truncation(**overrides) -> Truncation:
    """The recipe defaults (schema), with overrides."""
    settings = {**TruncationConfig().model_dump(exclude={"enabled"}), "near_budget_tokens": 8, **overrides}
    return Truncation(triggers=("Wait",), **settings)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(THINK_POLICY)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    rows = [json.loads(line) for line in EVAL.read_text().splitlines()[:24]]
    return [tokenizer(f"Question: {r['problem']}\nAnswer:")["input_ids"] for r in rows]


@pytest.fixture(scope="module")
def engine(ray_local):
    group = RolloutGroup(EngineSpec(str(THINK_POLICY), "float32", 512, seed=0, prefix_caching=True), 1,
                         LivenessConfig()).wait_ready()
    yield group
    group.shutdown()


def check_trajectory(c: dict, cfg: Truncation, tokenizer, max_new: int) -> None:
    """What every truncated rollout must satisfy, whatever its exit."""
    ids, inserted = c["token_ids"], c["inserted"]
    assert len(ids) == len(c["logprobs"]) == len(inserted) <= max_new
    assert [lp is None for lp in c["logprobs"]] == inserted  # inserted tokens have no engine log-prob
    assert c["text"] == tokenizer.decode(ids, skip_special_tokens=True)
    assert c["exit"] in EXIT_REASONS and len(c["confidences"]) == c["probes"] <= cfg.max_probes
    runs, run = [], []  # the inserted text, run by run
    for token, flag in zip(ids, inserted):
        if flag:
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    if run:
        runs.append(tokenizer.decode(run))
    budget = int(cfg.think_budget * max_new)
    if c["exit"] == "natural":
        assert all(r.strip() == "Wait" for r in runs), runs  # only re-appended triggers
        assert cfg.think_end in c["text"] or c["finish_reason"] == "length" or c["text"].strip()
    else:
        # The rollout ended the thinking: the answer text was inserted once, after the re-appended
        # triggers, within the thinking budget.
        assert runs[-1] == cfg.answer_text or runs[-1].endswith(cfg.answer_text), runs
        assert all(r.strip() == "Wait" for r in runs[:-1]), runs
        thinking = c["text"].index(cfg.answer_text)
        assert len(tokenizer(c["text"][:thinking])["input_ids"]) <= budget + 2
    if c["exit"] == "early_exit":
        assert c["confidences"][-1] > cfg.threshold
    if c["exit"] == "repetition":
        assert c["text"].count("Wait") >= cfg.repeat_chunks - 1


def generate(engine, prompts, cfg, n=4, max_new=MAX_NEW, mode="train", seeds=None):
    seeds = seeds or list(range(100, 100 + len(prompts)))
    return engine.generate(prompts, Sampling(n, 1.0, 1.0, max_new, cfg), mode, seeds)


@pytest.mark.parametrize("overrides, max_new, expected", [
    ({}, MAX_NEW, {"early_exit", "natural"}),                              # the recipe's settings
    ({"threshold": 1.0, "repeat_chunks": 2}, MAX_NEW, {"repetition"}),     # no confident exit: repeats end it
    ({"threshold": 1.0, "max_probes": 100}, 40, {"budget"}),                # a short budget
], ids=["defaults", "repetition", "budget"])
def test_rollouts_exit_for_their_reasons(engine, prompts, tokenizer, overrides, max_new, expected):
    cfg = truncation(**overrides)
    groups = generate(engine, prompts, cfg, max_new=max_new)
    completions = [c for g in groups for c in g]
    assert len(groups) == len(prompts) and all(len(g) == 4 for g in groups)
    for c in completions:
        check_trajectory(c, cfg, tokenizer, max_new)
    exits = {c["exit"] for c in completions}
    assert expected <= exits, exits
    # Seeded: the same rollouts again, whatever else is batched with them.
    again = generate(engine, prompts[:5], cfg, max_new=max_new, seeds=list(range(100, 105)))
    assert again == groups[:5]


def test_early_exits_shorten_the_thinking(engine, prompts, tokenizer):
    """The recipe's settings cut redundant checks: fewer steps and tokens than plain sampling."""
    plain = [c for g in generate(engine, prompts, None) for c in g]
    cut = [c for g in generate(engine, prompts, truncation()) for c in g]
    steps = lambda cs: statistics.fmean(count_steps(c["text"], ["Wait"]) for c in cs)  # noqa: E731
    tokens = lambda cs: statistics.fmean(len(c["token_ids"]) for c in cs)  # noqa: E731
    assert steps(cut) < steps(plain) and tokens(cut) < tokens(plain), (steps(cut), steps(plain))


def test_without_probes_lengths_match_plain_sampling(engine, prompts):
    """With probing off (max_probes 0) a rollout is plain sampling split at </think>: the same
    length distribution (different seeds per call, so compared in distribution)."""
    plain = [len(c["token_ids"]) for g in generate(engine, prompts, None, n=8) for c in g]
    split = [c for g in generate(engine, prompts, truncation(max_probes=0), n=8) for c in g]
    assert all(c["probes"] == 0 and c["exit"] == "natural" and not any(c["inserted"]) for c in split)
    lengths = [len(c["token_ids"]) for c in split]
    se = (statistics.variance(plain) / len(plain) + statistics.variance(lengths) / len(lengths)) ** 0.5
    assert abs(statistics.fmean(plain) - statistics.fmean(lengths)) < 3 * se
    for q in (0.25, 0.5, 0.75):
        assert abs(quantile(plain, q) - quantile(lengths, q)) <= 8


def quantile(xs, q):
    return sorted(xs)[int(q * (len(xs) - 1))]


def test_eval_mode_decodes_plainly(engine, prompts):
    greedy = Sampling(1, 0.0, 1.0, MAX_NEW)
    with_truncation = Sampling(1, 0.0, 1.0, MAX_NEW, truncation(threshold=0.0, strict=False))
    assert engine.generate(prompts[:6], with_truncation, "eval") == engine.generate(prompts[:6], greedy, "eval")
    with pytest.raises(Exception, match="mode must be one of"):
        engine.generate(prompts[:1], greedy, "test")


def test_prefix_cache_is_reset_after_a_weight_load(engine, prompts, tokenizer, tmp_path):
    """Truncated rollouts turn prefix caching on; KV blocks cached under old weights must not serve
    prompts after new weights arrive: greedy output after a load equals transformers' on the new weights."""
    model = AutoModelForCausalLM.from_pretrained(THINK_POLICY, dtype=torch.float32).eval()
    greedy = Sampling(1, 0.0, 1.0, 24)
    prompts = [sum(prompts[i:i + 10], []) for i in range(4)]  # longer than a KV block (CPU: 128 tokens)
    engine.generate(prompts, greedy, "eval")  # caches these prompts' blocks
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layers.0." in name:
                p.add_(torch.randn_like(p) * 0.2)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # with lm_head.weight, as the learner sends
    try:
        engine.load_weights("file", FileTransport(tmp_path).publish(state, 1), timeout_s=60)
        engine_out = [g[0]["token_ids"] for g in engine.generate(prompts, greedy, "eval")]
    finally:  # the module's engine goes on with the shipped weights
        shipped = AutoModelForCausalLM.from_pretrained(THINK_POLICY, dtype=torch.float32).state_dict()
        engine.load_weights("file", FileTransport(tmp_path / "shipped").publish(
            {k: v.clone() for k, v in shipped.items()}, 2), timeout_s=60)
    with torch.no_grad():
        for ids, got in zip(prompts, engine_out):
            out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            assert got == out[0, len(ids):].tolist()
