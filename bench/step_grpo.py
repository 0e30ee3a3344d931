"""Step-GRPO vs GRPO on the CPU testbed, side by side: steps and tokens per correct answer,
accuracy, rollout time.

Every arm runs the real CLI on `recipes/step_grpo_quickstart.yaml` (the tiny think policy, whose
pretraining traces hold 0-4 redundant "Wait, let me check" steps) with the same seed, so every arm
sees the same prompts in the same order; only the arm's patch differs:

- grpo: plain sampling, reward 0.9 x boxed accuracy + 0.1 x boxed format;
- step-grpo: dynamic truncated rollouts and the step-aware relative reward (beta 0.5);
- ablations (`--arms`): step-reward-only (no truncated rollouts), truncation-only (beta 0).

Reported per arm, from the run's own metrics: Σ rollout seconds and generated tokens over all
steps, and over the last `--tail` steps the training accuracy and the steps and tokens per correct
answer; and from its eval stage, which decodes plainly (greedy, no truncation) on held-out
problems, the same three. Ratios are arm ÷ grpo. Arms run one after another; timings are wall
clock on a shared machine, so compare ratios from one run.

    .venv/bin/python bench/step_grpo.py                         # grpo and step-grpo, seed 42 (~15 min on 2 cores)
    .venv/bin/python bench/step_grpo.py --arms grpo,step-grpo,step-reward-only,truncation-only --seeds 1,2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_trl as common  # noqa: E402  (the prunerl runner and its helpers are shared)

from rl.step_reward import count_steps  # noqa: E402

RECIPE = common.REPO / "recipes" / "step_grpo_quickstart.yaml"
MODEL = common.REPO / "recipes" / "assets" / "tiny-qwen2-think"
OFF = {"rollout": {"truncation": {"enabled": False}}, "rewards": {"step_aware": None}}
ARMS: dict[str, dict] = {
    "grpo": OFF,
    "step-grpo": {},  # the recipe as shipped
    "step-reward-only": {"rollout": {"truncation": {"enabled": False}}},
    "truncation-only": {"rewards": {"step_aware": {"beta": 0.0}}},
}
BASELINE = "grpo"
TRIGGERS = ["Wait"]  # the recipe's step_triggers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", default="grpo,step-grpo")
    p.add_argument("--steps", type=int, help="RL steps (default: the recipe's)")
    p.add_argument("--seeds", default="42")
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--tail", type=int, default=10, help="training metrics are means over the last N steps")
    p.add_argument("--out", type=Path, default=common.REPO / "bench" / "results" / "step_grpo.md")
    args = p.parse_args(argv)
    arms, seeds = args.arms.split(","), [int(s) for s in args.seeds.split(",")]
    common.QUICKSTART, common.MODEL = RECIPE, MODEL  # the recipe and model every arm patches
    steps = args.steps or next(s["steps"] for s in yaml.safe_load(RECIPE.read_text())["stages"]
                               if s["kind"] == "rl")
    work = (common.REPO / "runs" / f"step_grpo-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for seed in seeds:
        for arm in arms:
            print(f"[step_grpo] {arm}, seed {seed}", flush=True)
            run_dir = work / f"{arm}-seed{seed}"
            run = common.run_prunerl(ARMS[arm], steps, seed, args.eval_n, run_dir)
            if "error" in run:
                raise SystemExit(f"[step_grpo] {arm} seed {seed} failed: {run['error']}")
            runs[arm].append(arm_stats(run_dir, args.tail))
            print(f"[step_grpo] {arm} seed {seed}: {json.dumps(runs[arm][-1])}", flush=True)
    report = summarize(arms, runs, args, steps, seeds)
    print("\n" + report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    return 0


def arm_stats(run_dir: Path, tail: int) -> dict[str, float]:
    records = sorted((json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()),
                     key=lambda r: r["step"])
    train = [r for r in records if r["stage"] == "train"]
    last = train[-tail:]

    def tail_mean(key):
        values = [r[key] for r in last if key in r]
        return statistics.fmean(values) if values else float("nan")

    evals = [json.loads(x) for x in (run_dir / "eval" / "completions-train.jsonl").read_text().splitlines()]
    correct = [e for e in evals if e["correct"]]
    for e in correct:
        e["steps"] = count_steps(e["text"], TRIGGERS)
    return {
        "rollout_s": sum(r["timing/rollout"] for r in train),
        "generated_tokens": sum(r["rollout/tokens"] for r in train),
        "train_acc": tail_mean("reward/accuracy"),
        "train_steps_per_correct": tail_mean("response/steps_per_correct"),
        "train_tokens_per_correct": tail_mean("response/tokens_per_correct"),
        "early_exit": tail_mean("rollout/exit_early_exit"),
        "eval_acc": len(correct) / len(evals),
        "eval_steps_per_correct": statistics.fmean(e["steps"] for e in correct) if correct else float("nan"),
        "eval_tokens_per_correct": statistics.fmean(e["tokens"] for e in correct) if correct else float("nan"),
    }


COLUMNS = [  # (key, header, format)
    ("eval_acc", "eval acc", ".3f"), ("eval_steps_per_correct", "eval steps / correct", ".2f"),
    ("eval_tokens_per_correct", "eval tokens / correct", ".1f"), ("train_acc", "train acc", ".3f"),
    ("train_steps_per_correct", "train steps / correct", ".2f"),
    ("train_tokens_per_correct", "train tokens / correct", ".1f"), ("early_exit", "early exits", ".2f"),
    ("rollout_s", "Σ rollout s", ".1f"), ("generated_tokens", "generated tokens", ".0f"),
]
RATIOS = ["eval_acc", "eval_tokens_per_correct", "train_tokens_per_correct", "rollout_s"]


def summarize(arms, runs, args, steps, seeds) -> str:
    def mean(arm, key):
        values = [r[key] for r in runs[arm]]
        return statistics.fmean(values)

    lines = [
        "# Step-GRPO vs GRPO on the CPU testbed",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}; {os.cpu_count()} CPU cores; `bench/step_grpo.py --arms {','.join(arms)} "
        f"--seeds {','.join(map(str, seeds))} --eval-n {args.eval_n} --tail {args.tail}`; "
        f"`recipes/step_grpo_quickstart.yaml`, {steps} steps, same prompts for every arm.",
        f"Eval: greedy, plain decoding, first {args.eval_n} eval problems. Train columns: mean over the last "
        f"{args.tail} steps. Values are means over seeds, with the range when there are several.",
        "",
        "| arm | " + " | ".join(h for _, h, _ in COLUMNS) + " | " + " | ".join(f"{k} vs grpo" for k in RATIOS) + " |",
        "|---|" + "---|" * (len(COLUMNS) + len(RATIOS)),
    ]
    for arm in arms:
        cells = [common.spread([r[key] for r in runs[arm]], fmt) for key, _, fmt in COLUMNS]
        ratios = [common.ratio(mean(arm, key), mean(BASELINE, key)) if BASELINE in runs else "n/a" for key in RATIOS]
        lines.append(f"| {arm} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
