"""Synchronous vs one-step-off rollouts on the quickstart, and file vs collective weight sync by model size.

Part 1 (`--arms`): the quickstart recipe (tiny policy, 16 prompts x G 8, 64 new tokens) for the
same number of steps per arm, arms one after another: `sync` (generate, then train, then push
weights), `async` (`rollout.async: true`: step t+1 generates while step t trains) and
`async-2` (async on two engines). Reported: mean step time (step 1 excluded: nothing to overlap
yet), time-to-target training accuracy, start-up (process start to step 1's start), greedy eval.

Part 2 (`--sizes`): one learner rank and one engine on a random-init Qwen2 of each size; each
transport pushes the learner's weights to the engine `--pushes` times; reported: seconds per
push, and that as a share of one RL step of the bench's small shape at that size (4 prompts x
G 4, 32 new tokens), measured on the same workers.

    .venv/bin/python bench/pipeline.py                              # both parts (~15 min on 2 cores)
    .venv/bin/python bench/pipeline.py --sizes none --steps 30      # part 1 only
    .venv/bin/python bench/pipeline.py --arms none --sizes tiny,50m
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_trl as common  # noqa: E402  (the prunerl runner, greedy eval and statistics are shared)

ARMS: dict[str, dict] = {
    "sync": {"rollout": {"async": False, "engines": 1}},
    "async": {"rollout": {"async": True, "engines": 1}},
    "async-2": {"rollout": {"async": True, "engines": 2}},
}
# Qwen2 shapes: (hidden, layers, heads, kv heads, intermediate, vocab)
SIZES = {"tiny": None, "50m": (512, 8, 8, 2, 1408, 32000), "500m": (1024, 24, 16, 2, 2816, 151936)}


def pipeline_table(arms: list[str], steps: int, seed: int, eval_n: int, work: Path) -> list[str]:
    runs = {}
    for arm in arms:
        print(f"[pipeline] {arm}", flush=True)
        run = common.run_prunerl(ARMS[arm], steps, seed, eval_n or 8, work / arm)  # the recipe's eval needs >= 1
        if "error" in run:
            raise SystemExit(f"[pipeline] {arm} failed: {run['error']}")
        run["eval"] = common.greedy_accuracy(run["model"], eval_n) if eval_n else None
        runs[arm] = run
    finals = [common.final_ma(r) for r in runs.values()]
    target = 0.9 * min(f for f in finals if f is not None)
    base = runs[arms[0]]
    lines = [f"Part 1: quickstart, {steps} steps, seed {seed}; time-to-target = Σ step s until the trailing "
             f"5-step training accuracy reaches {target:.3f} (0.9 × the lowest final); ratios vs `{arms[0]}`.", "",
             "| arm | mean step s (steps 2+) | rollout wait s | train s | weight sync s | start-up s | train acc (last 5) "
             "| greedy eval | time-to-target s | step speed-up | time-to-target speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, run in runs.items():
        step = statistics.fmean(run["step_s"][1:])
        phase = {k: statistics.fmean(v[1:]) for k, v in run["phases"].items()}
        reached, ref = common.time_to_target(run, target), common.time_to_target(base, target)
        ttt = "not reached" if reached is None else f"{reached[0]:.1f} (step {reached[1]})"
        lines.append(
            f"| {arm} | {step:.2f} | {phase.get('rollout', 0):.2f} | {phase.get('train', 0):.2f} "
            f"| {phase.get('weight_sync', 0):.3f} | {run['startup_s']:.1f} | {common.final_ma(run):.3f} "
            f"| {'n/a' if run['eval'] is None else format(run['eval'], '.3f')} | {ttt} "
            f"| {statistics.fmean(base['step_s'][1:]) / step:.2f}× "
            f"| {common.ratio(ref[0] if ref else None, reached[0] if reached else None)} |")
    return lines


def random_model(size: str, out: Path) -> str:
    if SIZES[size] is None:
        return str(common.MODEL)
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    import torch

    hidden, layers, heads, kv, inter, vocab = SIZES[size]
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                         max_position_embeddings=1024, tie_word_embeddings=True, torch_dtype="float32")
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(common.MODEL).save_pretrained(out)
    print(f"[pipeline] {size}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters", flush=True)
    return str(out)


def sync_table(sizes: list[str], pushes: int, work: Path) -> list[str]:
    import ray

    from launch.schema import LivenessConfig, ModelConfig, RLStage
    from rl.controller import plan_microbatches
    from rl.learner_group import LearnerGroup
    from rl.rows import TrainingRow
    from rollout.weight_sync import WeightSync
    from rollout.worker import EngineSpec, RolloutGroup, Sampling

    lines = [f"Part 2: seconds per weight push (mean of {pushes}), one learner rank and one engine on CPU, "
             "and as a share of one RL step (4 prompts × G 4, 32 new tokens: generate + train; the first on "
             "these workers, so it includes first-call costs) at that size.", "",
             "| model | weights sent (elements; a tied head twice) | file s | collective s | collective vs file | RL step s | file % of step "
             "| collective % of step |", "|---|---|---|---|---|---|---|---|"]
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    try:
        for size in sizes:
            path = random_model(size, work / size)
            model_cfg = ModelConfig(path=path, dtype="float32")
            stage = RLStage(name="train", rollout={"max_new_tokens": 32})
            liveness = LivenessConfig()
            engines = RolloutGroup(EngineSpec(path, "float32", 256, seed=0), 1, liveness)
            learners = LearnerGroup(model_cfg, stage, 10, 0, liveness)
            engines.wait_ready()
            try:
                prompts = [[11 + i, 23, 37, 41 + i] * 4 for i in range(4)]
                t0 = time.perf_counter()
                groups = engines.generate(prompts, Sampling(4, 1.0, 1.0, 32), seeds=[0, 1, 2, 3])
                rows = [TrainingRow(p, c["token_ids"], c["logprobs"], 1.0 if k % 2 else -1.0)
                        for p, g in zip(prompts, groups) for k, c in enumerate(g)]
                per_rank, norm, _ = plan_microbatches(rows, len(rows), sum(r.loss_tokens for r in rows),
                                                      stage.learner, stage.packing)
                learners.call("train", per_rank_args=[(mbs, norm) for mbs in per_rank])
                step_s = time.perf_counter() - t0
                seconds = {}
                for transport in ("file", "collective"):
                    cfg = stage.rollout.weight_sync.model_copy(update={"transport": transport})
                    sync = WeightSync(cfg, learners, engines, work / size / "sync")
                    try:
                        sync.push(0)  # forms the group, first-touch costs
                        t0 = time.perf_counter()
                        for version in range(1, pushes + 1):
                            sync.push(version)
                        seconds[transport] = (time.perf_counter() - t0) / pushes
                    finally:
                        sync.close()
                params = sum(t.numel() for t in learners.call("full_state_dict")[0].values())
            finally:
                engines.shutdown()
                learners.shutdown()
            f, c = seconds["file"], seconds["collective"]
            lines.append(f"| {size} | {params / 1e6:.0f}M | {f:.3f} | {c:.3f} | {f / c:.2f}× | {step_s:.2f} "
                         f"| {100 * f / step_s:.1f}% | {100 * c / step_s:.1f}% |")
            print(f"[pipeline] {lines[-1]}", flush=True)
    finally:
        ray.shutdown()
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated, or 'none'")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-n", type=int, default=0, help="greedy eval problems per arm (0: skip)")
    p.add_argument("--sizes", default="tiny,50m,500m", help="comma-separated, or 'none'")
    p.add_argument("--pushes", type=int, default=3)
    p.add_argument("--out", type=Path, default=common.REPO / "bench" / "results" / "pipeline.md")
    args = p.parse_args(argv)
    arms = [] if args.arms == "none" else args.arms.split(",")
    sizes = [] if args.sizes == "none" else args.sizes.split(",")
    work = (common.REPO / "runs" / f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    work.mkdir(parents=True)
    lines = ["# One-step-off pipeline and weight-sync transports", "",
             f"{time.strftime('%Y-%m-%d %H:%M')}; {os.cpu_count()} CPU cores; `bench/pipeline.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`", ""]
    if arms:
        lines += pipeline_table(arms, args.steps, args.seed, args.eval_n, work) + [""]
    if sizes:
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            lines += sync_table(sizes, args.pushes, Path(tmp)) + [""]
    report = "\n".join(lines)
    print("\n" + report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
