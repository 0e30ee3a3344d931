"""prunerl against TRL 1.16's GRPOTrainer, side by side, on the quickstart's policy, data and settings.

    .venv/bin/python bench/vs_trl.py                                  # ARMS + TRL, 60 steps, seed 42
    .venv/bin/python bench/vs_trl.py --arms grpo,trl --steps 3 --eval-n 20   # a smoke run
    .venv/bin/python bench/vs_trl.py --arm 'lr3={"learner": {"optim": {"lr": 3e-4}}}'   # an ad-hoc arm

Each prunerl arm is the real CLI (`python -m launch run`) on recipes/quickstart.yaml with its train
stage deep-merged with the arm's patch; the TRL arm is GRPOTrainer in a child process with
`--trl-threads` torch threads. Arms run one after another, never together. Per arm and seed:
step times and `reward/accuracy` per step, start-up (launch -> first step), the rest of the wall
clock (launch -> end of training, minus the steps: start-up, checkpoints, final save), and the
greedy accuracy of the trained model, computed for every arm by the same function
(`greedy_accuracy`: transformers, the same prompts, the project's GSM8K verifier).
Time-to-target: the summed step time until the trailing 5-step mean of the training accuracy
first reaches the target (default: 90% of the reference arm's final 5-step mean).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `rewards` for the verifier (run from anywhere)

# prunerl arms: a patch deep-merged into the train stage of recipes/quickstart.yaml. One line per arm.
# Synchronous arms (generate, then train) are the on-policy loop TRL runs; `grpo-async` is the
# quickstart as shipped (one-step-off rollouts, collective weight sync).
SYNC = {"async": False, "weight_sync": {"transport": "file"}}
ARMS: dict[str, dict] = {
    "grpo": {"algorithm": "grpo", "rollout": SYNC},
    # Rollout and training alternate, so two 1-CPU actors keep one core busy at a time; these give
    # each actor both cores (Ray sets its OMP threads to 2), as TRL's one process has.
    "grpo-2cpu": {"algorithm": "grpo", "rollout": {**SYNC, "num_cpus_per_engine": 2}, "learner": {"num_cpus_per_rank": 2}},
    "cppo-0.875-2cpu": {"algorithm": "cppo", "selection": {"completions": {"method": "cppo", "rate": 0.875}},
                        "rollout": {**SYNC, "num_cpus_per_engine": 2}, "learner": {"num_cpus_per_rank": 2}},
    "grpo-async": {"algorithm": "grpo"},
}
TRL_VERSION = "1.16.0"
TRL = "trl"  # the TRL GRPOTrainer arm's name in --arms
REFERENCE_ARM = "grpo"  # the default target comes from this arm (ratios are always against TRL)

QUICKSTART = REPO / "recipes" / "quickstart.yaml"
MODEL = REPO / "recipes" / "assets" / "tiny-qwen2"
TRAIN = REPO / "recipes" / "assets" / "synth_gsm8k" / "train.jsonl"
EVAL = REPO / "recipes" / "assets" / "synth_gsm8k" / "eval.jsonl"
TEMPLATE = "Question: {question}\nAnswer:"
MA_WINDOW = 5
QUIET_CORES = 0.25  # a step is "quiet" when other processes used less CPU than this during it

# The quickstart's train stage, restated for TRL (checked against the recipe at start-up).
PROMPTS_PER_STEP, G, MAX_NEW_TOKENS, LR = 16, 8, 64, 1e-4

# Every GRPOConfig field that shapes the batch, the loss or the update, set explicitly: TRL's
# defaults moved across versions (loss_type "dapo", gradient_checkpointing and bf16 on, ...).
TRL_CONFIG = dict(
    # one generation batch of 16 prompts x 8 = 128 completions -> exactly one optimizer step
    per_device_train_batch_size=PROMPTS_PER_STEP * G, gradient_accumulation_steps=1,
    steps_per_generation=1, num_generations=G, num_iterations=1, shuffle_dataset=True,
    max_completion_length=MAX_NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0, min_p=None,
    repetition_penalty=1.0, use_vllm=False, use_transformers_continuous_batching=False,
    # loss: GRPO's per-sequence token mean, then the mean over sequences; PPO clip 0.2 both sides
    loss_type="grpo", beta=0.0, epsilon=0.2, epsilon_high=0.2, delta=None,
    importance_sampling_level="token", scale_rewards="group", mask_truncated_completions=False,
    top_entropy_quantile=1.0, entropy_coef=0.0, use_adaptive_entropy=False,
    off_policy_mask_threshold=None, use_bias_correction_kl=False,
    vllm_importance_sampling_correction=False, reward_weights=None,
    # optimizer: the quickstart's AdamW, constant lr, no warmup, clip 1.0
    learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
    optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0,
    # numerics and runtime
    use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, disable_dropout=True,
    cast_lm_head_to_fp32=False, torch_compile=False, use_liger_kernel=False,
    report_to="none", logging_steps=1, save_strategy="no", eval_strategy="no",
    dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False, log_completions=False,
)

NOT_MATCHED = [
    "Rollout engine: prunerl samples with vLLM 0.32 (CPU build, seeded engine RNG) and ships the "
    "weights to it after every step (`timing/weight_sync`); TRL samples with transformers "
    "`generate` on the training model itself (use_vllm=False; TRL's own vLLM sync fails on this "
    "CPU build). Samples, hence per-step rewards, are not paired across arms.",
    "Placement: prunerl runs Ray actors (1 vLLM engine and 1 DeepSpeed learner rank, 1 Ray CPU "
    "each: Ray sets OMP_NUM_THREADS=1 in them, vLLM binds its own OMP threads; rollout and "
    "training run one after the other) plus 2 reward worker processes and the driver; TRL is one "
    "process with `--trl-threads` torch threads for generation and training, scoring in-process "
    "and synchronously. `cores busy in steps` is what each actually used.",
    "Learner: DeepSpeed ZeRO-0 engine around torch AdamW, micro-batches packed to 4096 tokens "
    "(gradients accumulated, GRPO normalised by the global sequence count); TRL: HF Trainer, one "
    "128-row padded micro-batch. Same objective, different kernels and padding.",
    "Prompt order: prunerl's PromptSampler (numpy permutation per epoch) vs TRL's RepeatSampler "
    "(torch generator); the same seed draws different prompts per step.",
    "Checkpoints and logging: prunerl saves one checkpoint (at the last step) and its HF model, "
    "W&B disabled (WANDB_MODE=disabled); TRL save_strategy='no' then save_model() once, "
    "report_to='none'. Both lie outside the step times.",
    "Prompt truncation: prunerl left-truncates prompts to 128 tokens; TRL 1.16 has no prompt "
    "limit. The synthetic prompts are far shorter, so nothing is cut.",
]


# ------------------------------------------------------------------ the common greedy evaluation

def load_rows(path: Path, limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit]


def greedy_accuracy(model_dir: str | Path, n: int, batch_size: int = 50) -> float:
    """Greedy accuracy of an HF model folder on the first n eval problems: transformers `generate`,
    64 new tokens, the quickstart's prompt template (no chat template), the base model's tokenizer,
    scored by the project's GSM8K verifier. The same function for every arm. (Left-padded batches
    gave the same texts as one prompt at a time on the first 40 problems, 3x faster.)"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from rewards.gsm8k import reference_answer
    from rewards.verifiers import gsm8k_accuracy

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(MODEL)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = load_rows(EVAL, n)
    correct = 0
    for k in range(0, len(rows), batch_size):
        chunk = rows[k:k + batch_size]
        enc = tok([TEMPLATE.replace("{question}", r["question"]) for r in chunk], return_tensors="pt",
                  padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for text, row in zip(texts, chunk):
            try:
                correct += gsm8k_accuracy(text, reference_answer(row["answer"])) > 0
            except Exception:  # the reward pool scores a verifier failure 0; so do we
                pass
    return correct / len(rows)


# ------------------------------------------------------------------ prunerl arms (the real CLI)

def deep_merge(base: dict, patch: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_recipe(patch: dict, steps: int, seed: int, eval_n: int, path: Path) -> None:
    """recipes/quickstart.yaml with the arm's patch on its train stage, absolute asset paths, a
    checkpoint only at the end (TRL saves none during training), the eval stage on the trained
    model only (first eval_n problems)."""
    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe["seed"] = seed
    recipe["model"]["path"] = str(MODEL)
    for split in ("train", "eval"):
        recipe["data"][split]["path"] = str(REPO / recipe["data"][split]["path"])
    for i, stage in enumerate(recipe["stages"]):
        if stage["kind"] == "rl":
            stage = deep_merge(stage, {"steps": steps, "checkpoint": {"every_steps": steps}})
            recipe["stages"][i] = deep_merge(stage, patch)
        elif stage["kind"] == "eval":
            recipe["stages"][i] = deep_merge(stage, {"include_base": False, "limit": eval_n})
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


class CpuMeter:
    """CPU seconds (user + system) of a process and all its descendants (Ray's raylet, actors, vLLM's
    engine core, reward workers), sampled every `interval` s; a process that ends loses at most its
    last interval. Other users' processes on the machine are not counted."""

    def __init__(self, pid: int, interval: float = 1.0):
        import psutil

        self._psutil, self.pid, self.interval = psutil, pid, interval
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        ps = self._psutil
        try:
            root = ps.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except ps.Error:
            return
        for proc in procs:
            try:
                t = proc.cpu_times()
            except ps.Error:
                continue
            self.seen[proc.pid] = max(self.seen.get(proc.pid, 0.0), t.user + t.system)

    def total(self) -> float:
        return sum(self.seen.values())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.total()


def launch(cmd: list[str], env: dict, log: Path, step_line: re.Pattern, echo: bool) -> dict:
    """Run `cmd` from the repo root, its output to `log`; time-stamp each step line and meter CPU."""
    import psutil

    def machine_busy() -> float:  # CPU seconds of every process on the machine, all cores
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)

    at_step: dict[int, tuple[float, float, float]] = {}  # step -> (wall time of its line, our CPU s, machine's)
    t0 = time.time()
    with log.open("w", buffering=1) as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        meter = CpuMeter(proc.pid)
        for line in proc.stdout:
            f.write(line)
            if m := step_line.match(line):
                meter.sample()
                at_step[int(m.group(1))] = (time.time(), meter.total(), machine_busy())
                if echo:
                    print(f"    {line.rstrip()}", flush=True)
        rc = proc.wait()
    cpu = meter.stop()
    first, last = min(at_step, default=0), max(at_step, default=0)
    busy = others = float("nan")
    if last > first:
        (w0, ours0, all0), (w1, ours1, all1) = at_step[first], at_step[last]
        busy, others = (ours1 - ours0) / (w1 - w0), max(0.0, (all1 - all0) - (ours1 - ours0)) / (w1 - w0)
    # other processes' cores during each step (between its line and the previous one; None for step 1)
    per_step = {k: max(0.0, (at_step[k][2] - at_step[k - 1][2]) - (at_step[k][1] - at_step[k - 1][1]))
                / max(at_step[k][0] - at_step[k - 1][0], 1e-9) for k in at_step if k - 1 in at_step}
    return {"rc": rc, "t0": t0, "wall_s": time.time() - t0, "at_step": at_step, "cpu_s": cpu,
            "cores_busy": busy, "others_busy": others,
            "others_per_step": [per_step.get(k) for k in range(1, last + 1)]}


PRUNERL_STEP = re.compile(r"^step\s+(\d+)/\d+ \|")
TRL_STEP = re.compile(r"^\[bench\] step (\d+)$")


def run_prunerl(patch: dict, steps: int, seed: int, eval_n: int, run_dir: Path) -> dict:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    recipe = run_dir.parent / f"{run_dir.name}.yaml"
    log = run_dir.parent / f"{run_dir.name}.log"
    write_recipe(patch, steps, seed, eval_n, recipe)
    # The quickstart as a user runs it: Ray sets each 1-CPU actor's OMP_NUM_THREADS unless it is set.
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["WANDB_MODE"] = "disabled"
    proc = launch([sys.executable, "-m", "launch", "run", str(recipe), "--run-dir", str(run_dir)],
                  env, log, PRUNERL_STEP, echo=True)
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    records = sorted((r for r in records if r["stage"] == "train"), key=lambda r: r["step"])
    if proc["rc"] != 0 or len(records) != steps:
        return {"error": f"exit {proc['rc']}, {len(records)}/{steps} steps; log: {log}"}
    times = [r["timing/step"] for r in records]
    train_status = json.loads((run_dir / "train" / "status.json").read_text())
    eval_file = run_dir / "eval" / "results.json"
    own_eval = json.loads(eval_file.read_text())["train"]["accuracy"] if eval_file.exists() else None
    phases = sorted({k for r in records for k in r if k.startswith("timing/") and k != "timing/step"})
    return {
        "step_s": times,
        "accuracy": [r["reward/accuracy"] for r in records],
        "phases": {k.removeprefix("timing/"): [r.get(k, 0.0) for r in records] for k in phases},
        # step 1's progress line is printed as soon as step 1 ends
        "startup_s": proc["at_step"][1][0] - times[0] - proc["t0"] if 1 in proc["at_step"] else float("nan"),
        "wall_minus_steps_s": train_status["finished"] - proc["t0"] - sum(times),
        "wall_s": proc["wall_s"], "cpu_s": proc["cpu_s"],
        "cores_busy": proc["cores_busy"], "others_busy": proc["others_busy"],
        "others_per_step": proc["others_per_step"],
        "model": str(run_dir / "train" / "model"),
        "own_eval": own_eval,
        "log": str(log),
    }


# ------------------------------------------------------------------ the TRL arm (a child process)

def run_trl(steps: int, seed: int, threads: int, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    log, result = out_dir / "trl.log", out_dir / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_trl-worker",
           json.dumps({"steps": steps, "seed": seed, "threads": threads, "out": str(out_dir)})]
    proc = launch(cmd, env, log, TRL_STEP, echo=False)
    if proc["rc"] != 0 or not result.exists():
        return {"error": f"exit {proc['rc']}; log: {log}"}
    r = json.loads(result.read_text())
    ends = r["step_end"]
    times = [b - a for a, b in zip([r["train_begin"]] + ends[:-1], ends)]
    if len(times) != steps or len(r["accuracy"]) != steps:
        return {"error": f"{len(times)} steps, {len(r['accuracy'])} reward calls for {steps} steps; log: {log}"}
    gen, rew = r["generate_and_score_s"], r["reward_s"]
    return {
        "step_s": times,
        "accuracy": r["accuracy"],
        "phases": {"rollout": [g - w for g, w in zip(gen, rew)], "reward": rew,
                   "train": [t - g for t, g in zip(times, gen)]},
        "startup_s": r["train_begin"] - proc["t0"],
        "wall_minus_steps_s": r["saved"] - proc["t0"] - sum(times),
        "wall_s": proc["wall_s"], "cpu_s": proc["cpu_s"],
        "cores_busy": proc["cores_busy"], "others_busy": proc["others_busy"],
        "others_per_step": proc["others_per_step"],
        "model": r["model"],
        "own_eval": None,
        "threads": r["threads"],
        "log": str(log),
    }


def trl_worker(cfg: dict) -> None:
    """In the child: GRPOTrainer on the quickstart's setting; writes <out>/result.json."""
    import torch

    torch.set_num_threads(cfg["threads"])
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards.gsm8k import reference_answer
    from rewards.verifiers import gsm8k_accuracy

    assert trl.__version__ == TRL_VERSION, f"pinned to TRL {TRL_VERSION}, found {trl.__version__}"
    out = Path(cfg["out"])
    times: dict = {"step_end": [], "accuracy": [], "reward_s": [], "generate_and_score_s": []}

    def gsm8k_reward(prompts, completions, answer, **_):
        """The recipe's reward: gsm8k_accuracy (weight 1), 0 where the verifier fails."""
        start = time.perf_counter()
        scores = []
        for completion, reference in zip(completions, answer):
            try:
                scores.append(float(gsm8k_accuracy(completion, reference)))
            except BaseException:  # math-verify's TimeoutException is a BaseException
                scores.append(0.0)
        times["reward_s"].append(time.perf_counter() - start)
        times["accuracy"].append(sum(s > 0 for s in scores) / len(scores))
        return scores

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            start = time.perf_counter()
            result = super()._generate_and_score_completions(inputs)
            times["generate_and_score_s"].append(time.perf_counter() - start)
            return result

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            times["train_begin"] = time.time()

        def on_step_end(self, args, state, control, **kw):
            times["step_end"].append(time.time())
            print(f"[bench] step {state.global_step}", flush=True)

    tok = AutoTokenizer.from_pretrained(MODEL)
    probe = "Question: 1 + 2?\nAnswer:"
    if tok(probe)["input_ids"] != tok(probe, add_special_tokens=False)["input_ids"]:
        raise SystemExit("the tokenizer adds special tokens; TRL's prompts would differ from prunerl's")
    try:  # import and warm sympy now, as prunerl's reward workers do when its pool starts
        gsm8k_accuracy("\\boxed{0.5}", "\\frac{1}{2}")
    except Exception:
        pass
    rows = load_rows(TRAIN)
    data = Dataset.from_list([{"prompt": TEMPLATE.replace("{question}", r["question"]),
                               "answer": reference_answer(r["answer"])} for r in rows])
    args = GRPOConfig(output_dir=str(out / "trainer"), max_steps=cfg["steps"], seed=cfg["seed"], **TRL_CONFIG)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    trainer = Timed(model=model, reward_funcs=gsm8k_reward, args=args, train_dataset=data,
                    processing_class=tok, callbacks=[Clock()])
    trainer.train()
    trainer.save_model(str(out / "model"))
    times["saved"] = time.time()
    times.update(model=str(out / "model"), threads=torch.get_num_threads())
    (out / "result.json").write_text(json.dumps(times))


# ------------------------------------------------------------------ summaries

def moving_average(values: list[float], window: int = MA_WINDOW) -> list[float | None]:
    """Trailing mean over full windows only (None before `window` steps)."""
    return [None if i + 1 < window else sum(values[i + 1 - window:i + 1]) / window for i in range(len(values))]


def time_to_target(run: dict, target: float) -> tuple[float, int] | None:
    """(summed step seconds, step) when the trailing mean first reaches target; None if never."""
    for i, ma in enumerate(moving_average(run["accuracy"])):
        if ma is not None and ma >= target:
            return sum(run["step_s"][:i + 1]), i + 1
    return None


def final_ma(run: dict) -> float | None:
    return moving_average(run["accuracy"])[-1] if run["accuracy"] else None


def quiet_steps(run: dict) -> list[float]:
    """Step times of the steps during which other processes on the machine stayed under QUIET_CORES."""
    others = run.get("others_per_step") or []
    return [t for t, o in zip(run["step_s"], others) if o is not None and o < QUIET_CORES]


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def spread(xs: list[float], fmt: str) -> str:
    """mean, and the range when there are several seeds."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return "n/a"
    mean = statistics.fmean(xs)
    return format(mean, fmt) if len(xs) == 1 else f"{mean:{fmt}} ({min(xs):{fmt}}–{max(xs):{fmt}})"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a is not None and b else "n/a"


def summarize(arms: list[str], runs: dict[str, list[dict]], target: float, header: list[str]) -> str:
    ok = {arm: [r for r in runs[arm] if "error" not in r] for arm in arms}
    stats = {}
    for arm in arms:
        rs = ok[arm]
        if not rs:
            continue
        steps = [t for r in rs for t in r["step_s"]]
        reached = [time_to_target(r, target) for r in rs]
        hit = [x for x in reached if x is not None]
        stats[arm] = {
            "q": quartiles(steps),
            "startup": statistics.fmean(r["startup_s"] for r in rs),
            "ttt": statistics.fmean(t for t, _ in hit) if len(hit) == len(rs) else None,
            "ttt_startup": statistics.fmean(t + r["startup_s"] for (t, _), r in zip(reached, rs))
            if len(hit) == len(rs) else None,
            "reached": reached,
        }

    def ttt_cell(arm: str, with_startup: bool) -> str:
        if not math.isfinite(target):
            return f"n/a (no target: needs ≥ {MA_WINDOW} steps)"
        cells = []
        for r, x in zip(ok[arm], stats[arm]["reached"]):
            cells.append("not reached" if x is None else
                         f"{x[0] + (r['startup_s'] if with_startup else 0):.0f}s (step {x[1]})")
        return "; ".join(cells)

    base = stats.get(TRL)
    lines = header + ["",
                      "| arm | seeds | steps | s/step median [IQR] | s/step median, quiet steps | start-up s | wall − Σsteps s "
                      "| cores busy in steps | other processes' cores | train acc (last 5) | greedy eval acc | time-to-target (Σsteps) "
                      "| time-to-target + start-up | s/step vs TRL | start-up vs TRL | time-to-target vs TRL |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        failed = [r["error"] for r in runs[arm] if "error" in r]
        if arm not in stats:
            lines.append(f"| {arm} | failed: {'; '.join(failed)} |" + " |" * 14)
            continue
        rs, s = ok[arm], stats[arm]
        q1, med, q3 = s["q"]
        seeds = f"{len(rs)}" + (f" ({len(failed)} failed)" if failed else "")
        quiet = [t for r in rs for t in quiet_steps(r)]
        quiet_cell = f"{statistics.median(quiet):.2f} ({len(quiet)} steps)" if quiet else "n/a (no quiet step)"
        lines.append(
            f"| {arm} | {seeds} | {len(rs[0]['step_s'])} | {med:.2f} [{q1:.2f}–{q3:.2f}] | {quiet_cell} "
            f"| {spread([r['startup_s'] for r in rs], '.1f')} | {spread([r['wall_minus_steps_s'] for r in rs], '.1f')} "
            f"| {spread([r['cores_busy'] for r in rs], '.2f')} | {spread([r['others_busy'] for r in rs], '.2f')} "
            f"| {spread([final_ma(r) for r in rs], '.3f')} | {spread([r['eval'] for r in rs], '.3f')} "
            f"| {ttt_cell(arm, False)} | {ttt_cell(arm, True)} "
            f"| {ratio(med, base and base['q'][1])} | {ratio(s['startup'], base and base['startup'])} "
            f"| {ratio(s['ttt'], base and base['ttt'])} |")

    lines += ["", "Phases (median seconds per step; TRL's `rollout` is generation plus its log-prob and "
              "advantage bookkeeping, its `train` the rest of the step):", ""]
    names = sorted({p for arm in stats for r in ok[arm] for p in r["phases"]})
    lines += ["| arm | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for arm in stats:
        cells = [f"{statistics.median(v for r in ok[arm] for v in r['phases'].get(p, [])):.2f}"
                 if any(p in r["phases"] for r in ok[arm]) else "–" for p in names]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")

    lines += ["", "Per seed:", "",
              "| arm | seed | s/step median | Σ steps s | start-up s | process wall s | process CPU s "
              "| train acc (last 5) | greedy eval acc | prunerl eval stage (vLLM) | load avg 1 min (start → end) | log |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        for r in runs[arm]:
            if "error" in r:
                lines.append(f"| {arm} | {r['seed']} | failed: {r['error']} |" + " |" * 9)
                continue
            own = "–" if r["own_eval"] is None else f"{r['own_eval']:.3f}"
            fm = final_ma(r)
            lines.append(
                f"| {arm} | {r['seed']} | {statistics.median(r['step_s']):.2f} | {sum(r['step_s']):.1f} "
                f"| {r['startup_s']:.1f} | {r['wall_s']:.1f} | {r['cpu_s']:.0f} | {'n/a' if fm is None else f'{fm:.3f}'} "
                f"| {r['eval']:.3f} | {own} | {r['load'][0]:.1f} → {r['load'][1]:.1f} | `{r['log']}` |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ main

def check_quickstart() -> None:
    """The TRL arm restates the quickstart's train stage: fail loudly if the recipe moved."""
    stage = next(s for s in yaml.safe_load(QUICKSTART.read_text())["stages"] if s["kind"] == "rl")
    got = (stage["prompts_per_step"], stage["group_size"], stage["rollout"]["max_new_tokens"],
           stage["learner"]["optim"]["lr"], stage["rollout"]["temperature"], stage["loss"]["agg"],
           stage["loss"]["kl_coef"], stage["learner"]["optim"]["schedule"],
           stage["learner"]["optim"]["warmup_ratio"], stage["learner"]["optim"]["grad_clip"])
    want = (PROMPTS_PER_STEP, G, MAX_NEW_TOKENS, LR, 1.0, "grpo", 0.0, "constant", 0.0, 1.0)
    if got != want:
        raise SystemExit(f"recipes/quickstart.yaml's train stage changed: {got} != {want}; update bench/vs_trl.py")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default=",".join([*ARMS, TRL]),
                   help=f"comma-separated arms from ARMS ({', '.join(ARMS)}) or --arm, and '{TRL}' "
                        "(default: all of ARMS, then TRL)")
    p.add_argument("--arm", action="append", default=[], metavar="NAME=JSON",
                   help="an extra prunerl arm: a JSON patch of the train stage (repeatable; added to --arms)")
    p.add_argument("--steps", type=int, default=60, help="RL steps, the same for every arm")
    p.add_argument("--seeds", default="42", help="comma-separated seeds, run one after another")
    p.add_argument("--trl-threads", type=int, default=2, help="torch threads of the TRL process")
    p.add_argument("--eval-n", type=int, default=200, help="greedy eval on the first N eval problems")
    p.add_argument("--eval-threads", type=int, default=2, help="torch threads of the greedy evaluation")
    p.add_argument("--target", type=float, help="training-accuracy target (default: 0.9 × the reference "
                   f"arm's final {MA_WINDOW}-step mean; the reference is '{REFERENCE_ARM}' if run, else the first arm)")
    p.add_argument("--work-dir", type=Path, help="run folders (default runs/vs_trl-<timestamp>)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "vs_trl.md")
    p.add_argument("--_trl-worker", dest="trl_worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.trl_worker:
        trl_worker(json.loads(args.trl_worker))
        return 0
    check_quickstart()
    patches = dict(ARMS)
    for item in args.arm:
        name, _, patch = item.partition("=")
        patches[name] = json.loads(patch)
    arms = list(dict.fromkeys([a for a in args.arms.split(",") if a] + [a.partition("=")[0] for a in args.arm]))
    unknown = [a for a in arms if a != TRL and a not in patches]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; known: {[*patches, TRL]}")
    seeds = [int(s) for s in args.seeds.split(",")]
    work = (args.work_dir or REPO / "runs" / f"vs_trl-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    print(f"[vs_trl] arms {arms}, seeds {seeds}, {args.steps} steps; runs under {work}", flush=True)

    import torch

    torch.set_num_threads(args.eval_threads)
    t_base = time.time()
    base_acc = greedy_accuracy(MODEL, args.eval_n)
    print(f"[vs_trl] base model greedy accuracy {base_acc:.3f} on {args.eval_n} ({time.time() - t_base:.0f}s)")

    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for seed in seeds:
        for arm in arms:
            print(f"[vs_trl] {arm}, seed {seed}", flush=True)
            load_start = os.getloadavg()[0]
            if arm == TRL:
                run = run_trl(args.steps, seed, args.trl_threads, work / f"trl-seed{seed}")
            else:
                run = run_prunerl(patches[arm], args.steps, seed, args.eval_n, work / f"{arm}-seed{seed}")
            run.update(seed=seed, load=(load_start, os.getloadavg()[0]))
            if "error" in run:
                print(f"[vs_trl] {arm} seed {seed} FAILED: {run['error']}", flush=True)
            else:
                run["eval"] = greedy_accuracy(run["model"], args.eval_n)
                print(f"[vs_trl] {arm} seed {seed}: median {statistics.median(run['step_s']):.2f} s/step, "
                      f"start-up {run['startup_s']:.1f}s, greedy eval {run['eval']:.3f}", flush=True)
            runs[arm].append(run)

    if args.target is not None:
        target, source = args.target, "--target"
    else:
        ref = REFERENCE_ARM if REFERENCE_ARM in arms else arms[0]
        finals = [final_ma(r) for r in runs[ref] if "error" not in r and final_ma(r) is not None]
        target = 0.9 * statistics.fmean(finals) if finals else float("inf")
        source = f"0.9 × {ref}'s final {MA_WINDOW}-step mean training accuracy" + ("" if finals else " (unavailable)")
    trl_threads = next((r["threads"] for r in runs.get(TRL, []) if "threads" in r), args.trl_threads)
    header = [
        f"# prunerl vs TRL {TRL_VERSION} GRPOTrainer",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}; {os.cpu_count()} CPU cores; {args.steps} steps; seeds {seeds}; "
        f"policy recipes/assets/tiny-qwen2; 16 prompts × G = 8 per step; 64 new tokens; T = 1.0; lr 1e-4 "
        f"constant; clip 0.2; β = 0; loss agg grpo; one optimizer step per batch.",
        f"CPU budget: prunerl = the quickstart's placement (1 vLLM engine actor, 1 learner rank actor, "
        f"1 CPU each; 2 reward processes); TRL = one process, torch.set_num_threads({trl_threads}).",
        f"Greedy eval: the same transformers greedy decode for every arm, first {args.eval_n} eval problems "
        f"(base model: {base_acc:.3f}).",
        "Cores busy in steps: CPU seconds of the arm's whole process tree per wall second, from the first "
        "step's end to the last's (2.0 = both cores of a 2-core machine). Other processes' cores: the same for "
        "everything else on the machine over that span (other users' jobs competing for the cores; "
        f"the timings are only comparable where it is near 0); `quiet steps` are those during which it stayed "
        f"under {QUIET_CORES} cores (step 1 is never counted).",
        f"Time-to-target: Σ step seconds until the trailing {MA_WINDOW}-step mean of training "
        f"`reward/accuracy` first reaches {target:.3f} ({source}). Ratios are arm ÷ TRL.",
    ]
    (work / "runs.json").write_text(json.dumps({"target": target, "runs": runs}, indent=1))
    report = summarize(arms, runs, target, header)
    report += "\nNot matched between prunerl and TRL:\n\n" + "".join(f"- {x}\n" for x in NOT_MATCHED)
    report += "\nTRL GRPOConfig (besides output_dir, max_steps, seed):\n\n```\n" + \
        "\n".join(f"{k}={v!r}" for k, v in TRL_CONFIG.items()) + "\n```\n"
    print("\n" + report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"[vs_trl] wrote {args.out} and {work / 'runs.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
