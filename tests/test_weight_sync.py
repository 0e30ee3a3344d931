"""Weight sync: the collective transport's buckets, its group, and file vs collective on real
Ray + vLLM (CPU) + DeepSpeed. The pure tests run without Ray; the others are marked slow."""
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import ray
import torch
from transformers import AutoTokenizer

from conftest import REPO, TINY_POLICY
from launch.schema import LivenessConfig, WeightSyncConfig
from rl.learner import free_port
from rl.learner_group import LearnerGroup
from rl.liveness import WorkerFailure
from rollout.weight_sync import WeightSync, buckets_from_json, buckets_to_json, flatten, plan_buckets, unflatten
from rollout.worker import EngineSpec, RolloutGroup, Sampling
from test_integration import MODEL, fixed_rows, plan, stage_cfg

F32, BF16 = torch.float32, torch.bfloat16


# ---------------------------------------------------------------- buckets, without Ray

def test_buckets_keep_order_and_split_on_size_and_dtype():
    tensors = [("a", (4, 4), F32), ("b", (8,), F32), ("c", (2, 2), F32), ("d", (3,), BF16), ("e", (100,), BF16),
               ("f", (1,), BF16), ("g", (5,), F32)]
    buckets = plan_buckets(tensors, bucket_bytes=100)  # a: 64 B, b: 32 B, c: 16 B, e: 200 B
    assert [(b.dtype, b.names) for b in buckets] == [
        ("float32", ("a", "b")),      # + c would be 112 B
        ("float32", ("c",)),          # d is bfloat16
        ("bfloat16", ("d",)),         # + e would be 206 B
        ("bfloat16", ("e",)),         # larger than a bucket: alone
        ("bfloat16", ("f",)),
        ("float32", ("g",)),
    ]
    assert buckets[0].shapes == ((4, 4), (8,)) and buckets[0].numel == 24
    assert [n for b in buckets for n in b.names] == [t[0] for t in tensors]
    assert len(plan_buckets(tensors, bucket_bytes=2**30)) == 3  # only the dtype changes split
    assert buckets_from_json(buckets_to_json(buckets)) == buckets


def test_flatten_unflatten_round_trip():
    gen = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(3, 5, generator=gen), "b": torch.randn(5, generator=gen),
               "s": torch.tensor(2.5), "e": torch.empty(0, 4), "t": torch.randn(2, 3, generator=gen).t()}
    bucket, = plan_buckets([(k, t.shape, t.dtype) for k, t in tensors.items()], bucket_bytes=2**20)
    flat = flatten(bucket, tensors)
    assert flat.shape == (15 + 5 + 1 + 0 + 6,) and flat.dtype == F32
    restored = unflatten(flat.clone(), bucket)
    assert [name for name, _ in restored] == list(tensors)
    for name, t in restored:
        assert torch.equal(t, tensors[name]), name
    gathered = []

    @contextmanager
    def gathering(t):
        gathered.append(t)
        yield

    assert torch.equal(flatten(bucket, tensors, gathered=gathering), flat)
    # Each tensor gathered once, in order, while it is copied.
    assert len(gathered) == len(tensors) and all(a is b for a, b in zip(gathered, tensors.values()))


MEMBER = """
import sys, torch
from rollout.weight_sync import WeightGroup, plan_buckets, receive_buckets, send_buckets
from contextlib import nullcontext
rank, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
group = WeightGroup("127.0.0.1", port, rank, 3, 30, torch.device("cpu"), "127.0.0.1")
if rank == 0:
    gen = torch.Generator().manual_seed(1)
    sent = {f"layer{i}.weight": torch.randn(i + 1, 3, generator=gen).to(torch.bfloat16 if i % 3 == 2 else torch.float32)
            for i in range(7)}
    buckets = plan_buckets([(k, t.shape, t.dtype) for k, t in sent.items()], bucket_bytes=64)
    group.post_plan(buckets)
    send_buckets(buckets, sent, nullcontext, group, torch.device("cpu"))
else:
    sent = dict(receive_buckets(group.plan(), group))
torch.save(sent, out)
group.close()
"""


def test_group_broadcasts_buckets_to_every_member(tmp_path):
    """Three processes in a group of their own (no default process group): both receivers get every
    tensor in order, with its dtype and values, through several buckets of mixed dtypes."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", MEMBER, str(r), str(port), str(tmp_path / f"{r}.pt")], cwd=REPO)
             for r in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    sent = torch.load(tmp_path / "0.pt")
    assert len({t.dtype for t in sent.values()}) == 2
    for rank in (1, 2):
        received = torch.load(tmp_path / f"{rank}.pt")
        assert list(received) == list(sent)
        for name, t in sent.items():
            assert received[name].dtype == t.dtype and torch.equal(received[name], t), (rank, name)


# ---------------------------------------------------------------- real engines and learners

PROMPTS = [f"Question: Ann has {n} pens and gets {n + 4} more. How many pens does she have?\nAnswer:"
           for n in (3, 11, 25)]
SEEDS = [11, 22, 33]


def sample(group: RolloutGroup, prompts) -> list[list[dict]]:
    """Sampled completions with their log-probs; per-prompt seeds make them independent of the engine."""
    return group.generate(prompts, Sampling(n=2, temperature=0.7, top_p=1.0, max_new_tokens=16), seeds=SEEDS)


def assert_same_samples(got, expected, what: str) -> None:
    for g, e in zip(got, expected):
        for a, b in zip(g, e):
            assert a["token_ids"] == b["token_ids"], what
            torch.testing.assert_close(torch.tensor(a["logprobs"]), torch.tensor(b["logprobs"]), rtol=0, atol=1e-5,
                                       msg=lambda m: f"{what}: {m}")


def assert_changed(after, before) -> None:
    assert any(a["token_ids"] != b["token_ids"] or max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) > 1e-3
               for g, h in zip(after, before) for a, b in zip(g, h)), "the step did not change the samples"


def train_step(learners: LearnerGroup, rows, cfg) -> None:
    per_rank, norm, _ = plan(rows, cfg)
    learners.call("train", per_rank_args=[(mbs, norm) for mbs in per_rank])


@pytest.mark.slow
def test_a_reload_reaches_the_tied_output_head(ray_local, tmp_path):
    """The tiny policy's output head is its embedding matrix. After a weight load the engine must
    score with the new matrix in both places: its log-probs of what it samples equal those of
    transformers on the new weights (vLLM's reload alone leaves a tied head its old tensors)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_POLICY, dtype=F32).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings.add_(torch.randn_like(embeddings) * embeddings.std())
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, weights)
    tokenizer = AutoTokenizer.from_pretrained(TINY_POLICY)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    engine = RolloutGroup(EngineSpec(str(TINY_POLICY), "float32", 256, seed=0), engines=1,
                          liveness=LivenessConfig()).wait_ready()
    try:
        engine.load_weights("file", str(weights), 60)
        for prompt, completions in zip(prompts, sample(engine, prompts)):
            for c in completions:
                ids = torch.tensor([prompt + c["token_ids"]])
                with torch.no_grad():
                    logits = model(ids).logits[0, len(prompt) - 1:-1] / 0.7  # sample()'s temperature
                expected = logits.log_softmax(-1).gather(1, torch.tensor(c["token_ids"])[:, None])[:, 0]
                torch.testing.assert_close(torch.tensor(c["logprobs"]), expected, rtol=0, atol=1e-4)
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_collective_sync_equals_file_sync(ray_local, tmp_path):
    """ZeRO-3 on two learner ranks (each parameter gathered on its own). After a step, engines synced
    by `collective` (two engines) sample exactly what an engine synced by `file` samples, and not
    what they sampled before; a replaced engine gets the latest weights, the next push forms the
    group again, and a one-engine collective group matches too."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_POLICY)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    rows = fixed_rows(tokenizer)
    cfg = stage_cfg(ranks=2, zero_stage=3)
    cfg.learner.optim.lr = 1e-3
    spec = EngineSpec(str(TINY_POLICY), "float32", 256, seed=0, num_cpus=0.5)
    by_file = RolloutGroup(spec, engines=1, liveness=LivenessConfig())
    by_collective = RolloutGroup(spec, engines=2, liveness=LivenessConfig(), max_replacements=1)
    learners = LearnerGroup(MODEL, cfg, total_optimizer_steps=2, seed=0, liveness=LivenessConfig())
    file_sync = WeightSync(WeightSyncConfig(transport="file"), learners, by_file, tmp_path / "weights")
    # Small buckets: tensors of one vLLM layer (q/k/v, gate/up) straddle buckets.
    collective = WeightSync(WeightSyncConfig(transport="collective", bucket_mb=0.25), learners, by_collective,
                            tmp_path)
    try:
        by_file.wait_ready()
        by_collective.wait_ready()
        before = sample(by_file, prompts)
        assert_same_samples(sample(by_collective, prompts), before, "same weights before any sync")

        train_step(learners, rows, cfg)
        file_sync.push(1)
        collective.push(1)
        collective.push(1)  # into the group already formed
        expected = sample(by_file, prompts)
        assert_changed(expected, before)
        assert_same_samples(sample(by_collective, prompts), expected, "collective (2 engines) vs file")

        ray.kill(by_collective.workers[1])  # replaced during the next generate; pushed into alone
        assert_same_samples(sample(by_collective, prompts), expected, "a replaced engine")
        assert by_collective.restarts == [0, 1] and collective.members == [by_collective.workers[1]]

        train_step(learners, rows, cfg)
        file_sync.push(2)
        collective.push(2)  # both engines again: the group is formed anew
        assert collective.members == by_collective.workers
        expected = sample(by_file, prompts)
        assert_same_samples(sample(by_collective, prompts), expected, "collective after the engine set changed")

        collective.close()
        one_engine = WeightSync(WeightSyncConfig(transport="collective"), learners, by_file, tmp_path)
        one_engine.push(2)
        assert_same_samples(sample(by_file, prompts), expected, "collective into one engine")
        one_engine.close()
    finally:
        collective.close()
        learners.shutdown()
        by_file.shutdown()
        by_collective.shutdown()


@pytest.mark.slow
def test_sync_that_misses_its_deadline_names_the_engine(ray_local, tmp_path):
    """An engine whose process is stopped never joins the group: the push fails at its deadline with
    a WorkerFailure naming that engine. Once it runs again the next push succeeds; stopped again,
    the push into the formed group fails the same way."""
    cfg = stage_cfg(ranks=1, zero_stage=0)
    engines = RolloutGroup(EngineSpec(str(TINY_POLICY), "float32", 256, seed=0), engines=1, liveness=LivenessConfig())
    learners = LearnerGroup(MODEL, cfg, total_optimizer_steps=1, seed=0, liveness=LivenessConfig())
    sync = WeightSync(WeightSyncConfig(transport="collective", timeout_s=3), learners, engines, tmp_path)
    pid = None
    try:
        engines.wait_ready()
        pid = ray.get(engines.workers[0].__ray_call__.remote(lambda _: os.getpid()))
        for version in (1, 3):
            os.kill(pid, signal.SIGSTOP)
            start = time.monotonic()
            with pytest.raises(WorkerFailure, match=r"^weight sync.*: no answer from rollout engine 0\b.* within 3s$") as failure:
                sync.push(version)
            assert "rollout engine 0" in failure.value.workers and time.monotonic() - start < 10
            os.kill(pid, signal.SIGCONT)
            if version == 1:
                sync.push(2)
                assert sync.members == engines.workers
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        sync.close()
        learners.shutdown()
        engines.shutdown()


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="needs two CUDA GPUs: NCCL cannot put two members of one group on one GPU")
def test_collective_sync_over_nccl(ray_local, tmp_path):
    """Learner and engines on GPUs: the group is NCCL. The engine synced collectively samples
    exactly what the engine synced by file samples (they share the second GPU)."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_POLICY)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    rows = fixed_rows(tokenizer)
    cfg = stage_cfg(ranks=1, zero_stage=3, num_gpus_per_rank=1)
    cfg.learner.optim.lr = 1e-3
    learners = LearnerGroup(MODEL, cfg, total_optimizer_steps=1, seed=0, liveness=LivenessConfig())  # takes a GPU
    spec = EngineSpec(str(TINY_POLICY), "float32", 256, seed=0, num_gpus=0.4, gpu_memory_utilization=0.3)
    by_file = RolloutGroup(spec, engines=1, liveness=LivenessConfig())
    by_collective = RolloutGroup(spec, engines=1, liveness=LivenessConfig())
    collective = WeightSync(WeightSyncConfig(transport="collective", bucket_mb=0.25), learners, by_collective,
                            tmp_path)
    try:
        by_file.wait_ready()
        by_collective.wait_ready()
        before = sample(by_collective, prompts)
        train_step(learners, rows, cfg)
        WeightSync(WeightSyncConfig(transport="file"), learners, by_file, tmp_path / "weights").push(1)
        collective.push(1)
        assert ray.get(by_collective.workers[0].worker_rpc.remote("prunerl_device_type")) == ["cuda"]
        expected = sample(by_file, prompts)
        assert_changed(expected, before)
        assert_same_samples(sample(by_collective, prompts), expected, "collective (NCCL) vs file")
    finally:
        collective.close()
        learners.shutdown()
        by_file.shutdown()
        by_collective.shutdown()
