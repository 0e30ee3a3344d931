"""GRPO vs CPPO (P = 0.5 / 0.75 / 0.875) vs DPPO vs DPPO + Dense Prompt Packing, side by side.

Every arm trains the shipped tiny policy with the quickstart's settings (16 prompts x G = 8 per
step, 64 new tokens, lr 1e-4 constant, loss agg grpo) for the same number of steps, so every arm
sees the same number of prompts (no CPPO allocation), from a train split limited to
`--train-limit` prompts so that DPPO's prompt-level pruning has history to act on (it only prunes
prompts it has seen). Reported per arm: wall clock split by phase, learner tokens, greedy eval
accuracy, time-to-target, and each as a ratio to GRPO. Arms run one after another, never
concurrently; timings are wall clock on a shared machine, so compare ratios from one run.

    .venv/bin/python bench/speedup.py                      # all arms, 60 steps, seed 42 (~20 min on 2 cores)
    .venv/bin/python bench/speedup.py --seeds 1,2 --arms grpo,cppo-0.875
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
import vs_trl as common  # noqa: E402  (the prunerl runner, greedy eval and statistics are shared)

PADDED, DENSE = {"mode": "padded"}, {"mode": "dense"}
ARMS: dict[str, dict] = {
    "grpo": {"algorithm": "grpo", "packing": PADDED},
    "grpo+pack": {"algorithm": "grpo", "packing": DENSE},
    **{f"cppo-{p}": {"algorithm": "cppo", "selection": {"completions": {"method": "cppo", "rate": p}},
                     "packing": PADDED} for p in (0.5, 0.75, 0.875)},
    "dppo": {"algorithm": "dppo", "packing": PADDED},
    "dppo+pack": {"algorithm": "dppo", "packing": DENSE},
}
BASELINE = "grpo"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seeds", default="42")
    p.add_argument("--train-limit", type=int, default=320, help="train prompts (320: 3 epochs in 60 steps)")
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--target", type=float, help="training-accuracy target (default 0.9 x GRPO's final 5-step mean)")
    p.add_argument("--out", type=Path, default=common.REPO / "bench" / "results" / "speedup.md")
    args = p.parse_args(argv)
    arms, seeds = args.arms.split(","), [int(s) for s in args.seeds.split(",")]
    work = (common.REPO / "runs" / f"speedup-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    work.mkdir(parents=True)
    base = yaml.safe_load(common.QUICKSTART.read_text())
    base["data"]["train"]["limit"] = args.train_limit
    for stage in base["stages"]:  # the arms compare selection and packing on the synchronous loop
        if stage["kind"] == "rl":
            stage["rollout"].update(common.SYNC)
    common.QUICKSTART = work / "quickstart_limited.yaml"  # the recipe every arm patches
    common.QUICKSTART.write_text(yaml.safe_dump(base, sort_keys=False))

    import torch

    torch.set_num_threads(2)
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for seed in seeds:
        for arm in arms:
            print(f"[speedup] {arm}, seed {seed}", flush=True)
            run = common.run_prunerl(ARMS[arm], args.steps, seed, args.eval_n, work / f"{arm}-seed{seed}")
            if "error" in run:
                raise SystemExit(f"[speedup] {arm} seed {seed} failed: {run['error']}")
            run["eval"] = common.greedy_accuracy(run["model"], args.eval_n)
            run["metrics"] = [m for m in map(json.loads,
                                             (work / f"{arm}-seed{seed}" / "metrics.jsonl").read_text().splitlines())]
            runs[arm].append(run)
            print(f"[speedup] {arm} seed {seed}: {sum(run['step_s']):.1f}s in steps, eval {run['eval']:.3f}", flush=True)

    finals = [common.final_ma(r) for r in runs.get(BASELINE, [])]
    target = args.target if args.target is not None else 0.9 * statistics.fmean(finals)
    report = summarize(arms, runs, target, args, seeds)
    print("\n" + report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    return 0


def summarize(arms, runs, target, args, seeds) -> str:
    def mean(xs):
        return statistics.fmean(xs) if xs else float("nan")

    def per_arm(arm):
        rs = runs[arm]
        total = lambda key: [sum(m.get(key, 0.0) for m in r["metrics"]) for r in rs]  # noqa: E731
        reached = [common.time_to_target(r, target) for r in rs]
        return {
            "step": [sum(r["step_s"]) for r in rs],
            "rollout": total("timing/rollout"), "train": total("timing/train"),
            "tokens": total("train/tokens"), "pad": [mean([m["pack/padding_frac"] for m in r["metrics"]]) for r in rs],
            "skipped": total("select/prompts_skipped"),
            "eval": [r["eval"] for r in rs], "final": [common.final_ma(r) for r in rs],
            "ttt": [x[0] if x else None for x in reached], "reached": reached,
        }
    stats = {arm: per_arm(arm) for arm in arms}
    ref = stats.get(BASELINE)

    def rel(arm, key, invert=True):
        if ref is None or any(v is None for v in stats[arm][key] + ref[key]):
            return "n/a"
        a, b = mean(stats[arm][key]), mean(ref[key])
        return f"{(b / a if invert else a / b):.2f}×" if a and b else "n/a"

    lines = [
        "# Speed-up over our GRPO: CPPO, DPPO, Dense Prompt Packing",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}; {os.cpu_count()} CPU cores; `bench/speedup.py --steps {args.steps} "
        f"--seeds {','.join(map(str, seeds))} --train-limit {args.train_limit} --eval-n {args.eval_n}`; "
        f"quickstart settings (tiny policy, 16 prompts × G 8, 64 new tokens, lr 1e-4, agg grpo), "
        f"{args.steps} steps = {16 * args.steps} prompts seen by every arm.",
        f"Time-to-target: Σ step seconds until the trailing 5-step mean training accuracy reaches "
        f"{target:.3f} (0.9 × GRPO's final, unless --target). Speed-ups are GRPO ÷ arm (higher is faster); "
        "values are means over seeds, with the range when there are several.",
        "",
        "| arm | Σ step s | rollout s | train s | learner tokens | padding | prompts skipped | train acc (last 5) "
        "| greedy eval acc | time-to-target s | step speed-up | train-phase speed-up | learner tokens vs GRPO "
        "| time-to-target speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        s = stats[arm]
        ttt = "; ".join("not reached" if x is None else f"{x[0]:.0f} (step {x[1]})" for x in s["reached"])
        lines.append(
            f"| {arm} | {common.spread(s['step'], '.1f')} | {common.spread(s['rollout'], '.1f')} "
            f"| {common.spread(s['train'], '.1f')} | {common.spread(s['tokens'], '.0f')} | {common.spread(s['pad'], '.3f')} "
            f"| {common.spread(s['skipped'], '.0f')} | {common.spread(s['final'], '.3f')} | {common.spread(s['eval'], '.3f')} "
            f"| {ttt} | {rel(arm, 'step')} | {rel(arm, 'train')} | {rel(arm, 'tokens', invert=False)} | {rel(arm, 'ttt')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
