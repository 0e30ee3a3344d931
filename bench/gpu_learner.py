"""The learner step on one device: peak memory and tokens/s of `rl.learner.LearnerWorker.train`.

    python bench/gpu_learner.py                       # CUDA: the published grpo_gsm8k learner step, ZeRO 0 and 3
    python bench/gpu_learner.py --suite --out bench/results/gpu_learner-h100.txt
    python bench/gpu_learner.py --zero 0 --kl 0 --chunk 512 --packing dense --completion-tokens 4096
    .venv/bin/python bench/gpu_learner.py --device cpu --tiny --suite   # this script's own check (below)

The real learner path, without Ray or vLLM: one DeepSpeed rank (`LearnerWorker.setup(rank=0,
world_size=1, ...)`: NCCL on CUDA, gloo with DS_ACCELERATOR=cpu on CPU), then `LearnerWorker.train`
on micro-batches planned as `rl.controller.plan_microbatches` plans them (its `rl.batching` calls,
repeated here because `rl.controller` imports Ray). The model is random-init from a transformers
config (default: Qwen2.5-1.5B's architecture, written inline below) saved to a temp folder, so no
download is needed; the tokenizer is never read. Rows are random token ids with random advantages
and no rollout log-probs (mismatch correction off, as in the recipe).

Defaults mirror recipes/grpo_gsm8k.yaml's learner: 16 rows x (512 prompt + 1024 completion) tokens,
loss `dapo`, mu = 2, kl_coef 0.04 (so a reference model is loaded), gradient checkpointing,
16,384-token padded micro-batches, the head in 2,048-token chunks (the schema default), bf16 on
CUDA (float32 on CPU), AdamW lr 1e-6 cosine with 10% warm-up, grad clip 1.0.

Each configuration runs in a fresh child process (DeepSpeed and process-group state), which the
script starts by re-invoking itself: set-up, one warm-up `train` call (not timed), then `--steps`
timed calls. Reported per configuration:
  peak GiB   torch.cuda.max_memory_allocated over the child's life (set-up included); on CPU the
             process's peak RSS instead (and no other memory column)
  passes     the peak within train()'s forward/backward passes (reference, old-policy, policy)
  opt step   the peak within the optimizer step (`engine.step()`, wrapped by this script)
  held GiB   memory allocated after the last call: weights, optimizer state, reference model
  s/train    mean seconds of one timed `train` call (mu optimizer steps, plus the reference and
             old-policy passes)
  tokens/s   rows x (prompt + completion) tokens of one batch / s/train: batch tokens trained per
             second, each counted once however many passes mu and the KL make over them
  grad_norm, loss  of the last timed call (`train`'s own statistics)
and the ratio of peak and tokens/s to the first configuration. A configuration that fails (out of
memory, a time-out) gets a line saying so and what it reached; the others still run.
`--out FILE` also writes FILE.json (every field) and FILE.log (the children's output).

`--device cpu --tiny` (hidden 64, 2 layers, vocab 2048; 4 rows x (16 + 48) tokens, 128-token
micro-batches, chunks of 64) runs the same path on CPU in ~45 s on 2 cores; the first DeepSpeed
CPU run on a machine also builds its shared-memory comm op once (~2 min, cached in
~/.cache/torch_extensions). In float32 its ZeRO 0 and ZeRO 3 lines must show the same grad norm
and loss.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB = 1024 ** 3

# Qwen2.5-1.5B's architecture (its config.json), random weights.
PUBLISHED_MODEL = {"hidden": 1536, "layers": 28, "heads": 12, "kv_heads": 2, "intermediate": 8960, "vocab": 151936}
TINY_MODEL = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 2048}
# recipes/grpo_gsm8k.yaml's learner settings (chunk: the schema's default, which the recipe keeps).
PUBLISHED_RUN = {"rows": 16, "prompt_tokens": 512, "completion_tokens": 1024, "max_tokens": 16384, "chunk": 2048,
                 "steps": 3}
TINY_RUN = {"rows": 4, "prompt_tokens": 16, "completion_tokens": 48, "max_tokens": 128, "chunk": 64, "steps": 2}


def suite(args) -> list[dict]:
    """--suite: ZeRO 0 and ZeRO 3 at the published settings, then ZeRO 0 with a quarter of the chunk."""
    return [{"label": "zero0", "zero": 0}, {"label": "zero3", "zero": 3},
            {"label": f"zero0-chunk{max(1, args.chunk // 4)}", "zero": 0, "chunk": max(1, args.chunk // 4)}]


# ------------------------------------------------------------------------------------- children

def make_model(cfg: dict) -> dict:
    """A random-init Qwen2 causal LM saved with save_pretrained, for `load_policy` to read."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    start = time.perf_counter()
    torch.manual_seed(cfg["seed"])
    config = Qwen2Config(hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"],
                         num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"],
                         intermediate_size=cfg["intermediate"], vocab_size=cfg["vocab"], tie_word_embeddings=True,
                         max_position_embeddings=max(32768, cfg["prompt_tokens"] + cfg["completion_tokens"]),
                         rms_norm_eps=1e-6, use_cache=False)
    # Initialise on the device the benchmark uses: a 1.5B model's init is slow on a few CPU cores.
    with torch.device(cfg["device"]):
        model = Qwen2ForCausalLM(config).to(getattr(torch, cfg["dtype"]))
    model.save_pretrained(cfg["model_dir"])
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "seconds": time.perf_counter() - start}


def run_config(cfg: dict) -> dict:
    """One configuration in this (fresh) process: set-up, a warm-up `train`, `steps` timed ones."""
    if cfg["device"] == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
        import torch
        torch.set_num_threads(cfg["threads"])
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cuda")
    import torch

    sys.path.insert(0, str(REPO))
    from launch.schema import ModelConfig, RLStage
    from rl.batching import dense_microbatches, padding_fraction, split_across_ranks, token_budget_microbatches
    from rl.learner import LearnerWorker, LossNormaliser, free_port
    from rl.rows import TrainingRow

    cuda = cfg["device"] == "cuda"
    out: dict = {"phase": "setup"}

    # CUDA peaks by phase: set-up, forward/backward passes (everything in train() but the optimizer
    # step), the optimizer step (engine.step, wrapped below). Each phase resets the peak counter.
    peaks = {"setup": 0, "passes": 0, "step": 0}

    def mark(phase: str) -> None:
        peaks[phase] = max(peaks[phase], torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()

    def memory() -> dict:
        if not cuda:
            return {"peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}
        peak = max(*peaks.values(), torch.cuda.max_memory_allocated())
        return {"peak_gib": peak / GIB, "held_gib": torch.cuda.memory_allocated() / GIB,
                **{f"{k}_peak_gib": v / GIB for k, v in peaks.items()}}

    model_cfg = ModelConfig(path=cfg["model_dir"], dtype=cfg["dtype"])
    stage = RLStage.model_validate({
        "name": "bench", "kind": "rl", "algorithm": "grpo", "prompts_per_step": 1, "group_size": cfg["rows"],
        "advantage": {"scale": "group", "eps": 1e-4},
        "loss": {"agg": "dapo", "eps_low": 0.2, "eps_high": 0.2, "kl_coef": cfg["kl"], "iterations": cfg["iterations"]},
        "rollout": {"temperature": 1.0, "max_new_tokens": cfg["completion_tokens"]},
        "packing": {"mode": cfg["packing"], "window": cfg["window"]},
        "learner": {"ranks": 1, "num_gpus_per_rank": 1 if cuda else 0, "zero_stage": cfg["zero"],
                    "max_tokens_per_microbatch": cfg["max_tokens"], "logprob_chunk_tokens": cfg["chunk"],
                    "gradient_checkpointing": cfg["grad_ckpt"],
                    "optim": {"lr": 1e-6, "schedule": "cosine", "warmup_ratio": 0.1, "grad_clip": 1.0}},
    })

    # Rows: random ids (never 0, the pad id), advantages normalised over the group as GRPO's are.
    gen = torch.Generator().manual_seed(cfg["seed"])
    rewards = torch.randn(cfg["rows"], generator=gen)
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
    rows = [TrainingRow(torch.randint(1, cfg["vocab"], (cfg["prompt_tokens"],), generator=gen).tolist(),
                        torch.randint(1, cfg["vocab"], (cfg["completion_tokens"],), generator=gen).tolist(),
                        None, float(a)) for a in advantages]
    # As rl.controller.plan_microbatches, one rank.
    lengths = [r.length for r in rows]
    packed = stage.packing.mode == "dense"
    if packed:
        batches = dense_microbatches(lengths, stage.learner.max_tokens_per_microbatch, stage.packing.window)
    else:
        batches = token_budget_microbatches(lengths, stage.learner.max_tokens_per_microbatch)
    (mine,) = split_across_ranks(batches, lengths, 1)
    microbatches = [[rows[i] for i in mb] for mb in mine]
    norm = LossNormaliser(num_seqs=len(rows), num_tokens=max(1.0, sum(r.loss_tokens for r in rows)),
                          num_microbatches=len(batches))
    batch_tokens = sum(lengths)
    out.update(microbatches=len(batches), padding_frac=padding_fraction(lengths, batches, packed=packed),
               batch_tokens=batch_tokens, torch=torch.__version__)
    if cuda:
        out["gpu"] = torch.cuda.get_device_name()

    worker = LearnerWorker()
    try:
        start = time.perf_counter()
        worker.setup(rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port(), model_cfg=model_cfg,
                     stage=stage, total_optimizer_steps=(1 + cfg["steps"]) * cfg["iterations"], seed=cfg["seed"])
        if cuda:
            torch.cuda.synchronize()
        import deepspeed
        import transformers
        out.update(setup_s=time.perf_counter() - start, deepspeed=deepspeed.__version__,
                   transformers=transformers.__version__, **memory())
        out["setup_gib"] = out.pop("held_gib", None)
        if cuda:
            mark("setup")
            engine_step = worker.engine.step

            def step_with_peaks(*a, **k):
                mark("passes")
                result = engine_step(*a, **k)
                mark("step")
                return result

            worker.engine.step = step_with_peaks  # an instance attribute: train() calls self.engine.step()

        out["phase"] = "warm-up"
        start = time.perf_counter()
        worker.train(microbatches, norm)
        out["warmup_s"] = time.perf_counter() - start
        if cuda:
            mark("passes")
        out.update(memory())
        times = []
        for i in range(cfg["steps"]):
            out["phase"] = f"step {i + 1}"
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            stats = worker.train(microbatches, norm)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            if cuda:
                mark("passes")
            out.update(memory())
        out.update(phase="done", ok=True, step_s=sum(times) / len(times), step_times=times,
                   tokens_per_s=batch_tokens / (sum(times) / len(times)), grad_norm=stats["grad_norm"],
                   loss=stats["loss"], kl=stats["kl"] / max(stats["tokens"], 1.0), lr=stats["lr"])
    except Exception as err:  # noqa: BLE001 - an OOM above all: report how far it got and what it held
        is_oom = cuda and isinstance(err, torch.cuda.OutOfMemoryError)
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        out.update(ok=False, error=f"{'OOM' if is_oom else type(err).__name__} in {out['phase']}: {message[:400]}",
                   **memory())
        import traceback
        traceback.print_exc()
    finally:
        worker.shutdown()
    return out


# ------------------------------------------------------------------------------------- parent

def child(mode: str, cfg: dict, timeout: float, log) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--{mode}", json.dumps(cfg)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if cfg["device"] == "cpu":
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(cfg["threads"]), CUDA_VISIBLE_DEVICES="")
    log.write(f"\n===== {mode} {cfg.get('label', '')}: {json.dumps(cfg)}\n")
    log.flush()
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              timeout=timeout, cwd=REPO)
        text, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as exc:
        text = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rc = None
    log.write(text)
    log.flush()
    results = [line[len("RESULT "):] for line in text.splitlines() if line.startswith("RESULT ")]
    out = json.loads(results[-1]) if results else {"ok": False}
    out["wall_s"] = time.perf_counter() - start
    if rc is None:
        out.update(ok=False, error=f"timed out after {timeout:.0f} s (in {out.get('phase', 'start-up')})")
    elif not results:
        tail = [line for line in text.strip().splitlines() if line.strip()][-3:]
        out.update(ok=False, error=f"exit code {rc}: " + " | ".join(tail)[-600:])
    elif rc != 0 and out.get("ok"):
        out.update(ok=False, error=f"exit code {rc} after finishing")
    return out


MEMORY = (("peak_gib", "peak GiB"), ("passes_peak_gib", "passes"), ("step_peak_gib", "opt step"),
          ("held_gib", "held GiB"))
HEADER = (f"{'config':<16}{'zero':>5}{'kl':>6}{'chunk':>6}{'packing':>8}{'mbs':>4}"
          + "".join(f"{title:>10}" for _, title in MEMORY)
          + f"{'s/train':>9}{'tokens/s':>10}{'grad_norm':>11}{'loss':>11}{'peak x':>8}{'tok/s x':>8}")


def params_text(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def table_line(cfg: dict, r: dict, first: dict | None) -> str:
    head = (f"{cfg['label']:<16}{cfg['zero']:>5}{cfg['kl']:>6g}{cfg['chunk']:>6}{cfg['packing']:>8}"
            f"{r.get('microbatches', '-'):>4}")
    memory = "".join(f"{r[key]:>10.2f}" if r.get(key) is not None else f"{'-':>10}" for key, _ in MEMORY)
    if not r.get("ok"):
        return f"{head}{memory}  FAILED: {r.get('error', '?')}"
    ratio_peak = ratio_tps = "-"
    if first is not None and first.get("ok"):
        ratio_peak = f"{r['peak_gib'] / first['peak_gib']:.2f}"
        ratio_tps = f"{r['tokens_per_s'] / first['tokens_per_s']:.2f}"
    return (f"{head}{memory}{r['step_s']:>9.2f}{r['tokens_per_s']:>10.0f}{r['grad_norm']:>11.4g}"
            f"{r['loss']:>11.4g}{ratio_peak:>8}{ratio_tps:>8}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and batch (the CPU self-check)")
    parser.add_argument("--suite", action="store_true",
                        help="ZeRO 0 and ZeRO 3 at the chosen settings, then ZeRO 0 with a quarter of --chunk")
    parser.add_argument("--zero", default="0,3", help="comma-separated ZeRO stages, one configuration each")
    group = parser.add_argument_group("model (default: Qwen2.5-1.5B's architecture; --tiny: hidden 64, 2 layers)")
    for name in PUBLISHED_MODEL:
        group.add_argument(f"--{name.replace('_', '-')}", type=int)
    group.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                       help="default bfloat16 on CUDA, float32 on CPU")
    group.add_argument("--model-dir", help="use this saved model folder instead of making one")
    group = parser.add_argument_group("workload (default: recipes/grpo_gsm8k.yaml's learner)")
    group.add_argument("--rows", type=int)
    group.add_argument("--prompt-tokens", type=int)
    group.add_argument("--completion-tokens", type=int)
    group.add_argument("--max-tokens", type=int, help="learner.max_tokens_per_microbatch")
    group.add_argument("--chunk", type=int, help="learner.logprob_chunk_tokens")
    group.add_argument("--packing", choices=["padded", "dense"], default="padded")
    group.add_argument("--window", type=int, default=16, help="packing.window (dense)")
    group.add_argument("--kl", type=float, default=0.04, help="loss.kl_coef (0: no reference model)")
    group.add_argument("--iterations", type=int, default=2, help="loss.iterations (mu)")
    group.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false")
    group.add_argument("--steps", type=int, help="timed train() calls after one warm-up call")
    group.add_argument("--seed", type=int, default=42)
    group.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--config-timeout", type=float, default=1200, help="seconds per configuration's child")
    parser.add_argument("--out", help="also write the table here, FILE.json and FILE.log beside it")
    parser.add_argument("--run-config", help=argparse.SUPPRESS)
    parser.add_argument("--make-model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = {**TINY_MODEL, **TINY_RUN} if args.tiny else {**PUBLISHED_MODEL, **PUBLISHED_RUN}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.steps < 1 or args.rows < 2 or min(args.prompt_tokens, args.completion_tokens, args.chunk) < 1:
        parser.error("--steps and the token counts must be >= 1, --rows >= 2 (group_size)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    for mode in ("run_config", "make_model"):
        if getattr(args, mode):
            result = (run_config if mode == "run_config" else make_model)(json.loads(getattr(args, mode)))
            print("RESULT " + json.dumps(result), flush=True)
            return

    base = {k: getattr(args, k) for k in (*PUBLISHED_MODEL, *PUBLISHED_RUN, "device", "dtype", "packing", "window",
                                          "kl", "iterations", "grad_ckpt", "seed", "threads")}
    configs = suite(args) if args.suite else [{"label": f"zero{z}", "zero": int(z)} for z in args.zero.split(",")]
    configs = [{**base, **c} for c in configs]

    out_path = Path(args.out) if args.out else None
    if out_path:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    log_path = out_path.with_name(out_path.name + ".log") if out_path else Path(tempfile.mkstemp(suffix=".log")[1])
    lines: list[str] = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    model_dir = args.model_dir or tempfile.mkdtemp(prefix="gpu_learner_model_")
    made = None
    try:
        with open(log_path, "w") as log:
            if not args.model_dir:
                made = child("make-model", {**base, "model_dir": model_dir}, args.config_timeout, log)
                if not made.get("params"):
                    sys.exit(f"making the model failed: {made.get('error')} (log: {log_path})")
            emit(f"# bench/gpu_learner.py {' '.join(sys.argv[1:] if argv is None else argv)}   ({started})")
            emit(f"# model: Qwen2 hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} kv, "
                 f"intermediate {args.intermediate}, vocab {args.vocab}, tied"
                 + (f", {params_text(made['params'])} params (made in {made['seconds']:.0f} s)" if made else "")
                 + f"; {args.dtype} on {args.device}")
            emit(f"# batch: {args.rows} rows x ({args.prompt_tokens} + {args.completion_tokens}) tokens, "
                 f"max_tokens_per_microbatch {args.max_tokens}, mu {args.iterations}, "
                 f"grad ckpt {'on' if args.grad_ckpt else 'off'}, {args.steps} timed train() calls after 1 warm-up")
            results = []
            for cfg in configs:
                r = child("run-config", {**cfg, "model_dir": model_dir}, args.config_timeout, log)
                results.append(r)
                if len(results) == 1:
                    keys = ("gpu", "torch", "transformers", "deepspeed")
                    emit("# " + ", ".join(f"{k} {r[k]}" for k in keys if r.get(k)))
                    if args.device == "cuda":
                        emit("# GiB: peak = torch.cuda.max_memory_allocated over the config's process; passes / "
                             "opt step = the peak within train()'s forward+backward passes / within engine.step(); "
                             "held = allocated after the last call")
                    else:
                        emit("# peak GiB = the config's process's peak RSS (CPU)")
                    emit(f"# tokens/s = batch tokens / seconds per train() call; x = ratio to {configs[0]['label']}")
                    emit(HEADER)
                emit(table_line(cfg, r, results[0]))
    finally:
        if not args.model_dir:
            shutil.rmtree(model_dir, ignore_errors=True)
    if out_path:
        out_path.write_text("\n".join(lines) + "\n")
        out_path.with_name(out_path.name + ".json").write_text(json.dumps(
            {"command": sys.argv, "started": started, "model": made,
             "configs": [{**c, "result": r} for c, r in zip(configs, results)]}, indent=1) + "\n")
        print(f"# wrote {out_path}, {out_path.name}.json, {out_path.name}.log", flush=True)
    if not all(r.get("ok") for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
