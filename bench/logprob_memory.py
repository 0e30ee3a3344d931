"""Peak memory of the log-prob head: full logits (`direct_logprobs`) against the chunked head.

    .venv/bin/python bench/logprob_memory.py                         # 2048 tokens, vocab 151936
    .venv/bin/python bench/logprob_memory.py --tokens 8192 --chunk 1024

A random-init Qwen2 with a large vocabulary (Qwen2.5's 151,936, tied embeddings) and a small body,
so the vocabulary head dominates as it does in real RL steps. One packed micro-batch of
`--tokens` tokens (a quarter prompt, three quarters completion), forward + backward of
sum(logp * advantage). Each variant runs in its own child process so their peaks do not mix:
CPU peak = resource.getrusage(RUSAGE_SELF).ru_maxrss (whole process: weights, grads, activations);
on CUDA also torch.cuda.max_memory_allocated. "pass" columns are the peak minus what the process
held before the first pass. Both variants print the loss, which must agree.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GIB = 1024 ** 3


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(args) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rl.collate import collate
    from rl.logprobs import completion_logprobs, direct_logprobs
    from rl.rows import TrainingRow

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True, max_position_embeddings=args.tokens)
    model = Qwen2ForCausalLM(config).to(device=device, dtype=dtype).train()

    g = torch.Generator().manual_seed(1)
    per_row = args.tokens // args.rows
    prompt = per_row // 4
    rows = [TrainingRow(torch.randint(args.vocab, (prompt,), generator=g).tolist(),
                        torch.randint(args.vocab, (per_row - prompt,), generator=g).tolist(), None,
                        advantage=(-1.0) ** k) for k in range(args.rows)]
    batch = collate(rows, 0, packed=True).to(device)
    if args.variant == "direct":
        forward = lambda: direct_logprobs(model, batch, args.temperature)  # noqa: E731
    else:
        forward = lambda: completion_logprobs(model, batch, args.temperature, args.chunk)  # noqa: E731

    def one_pass() -> float:
        model.zero_grad(set_to_none=True)
        logp, _ = forward()
        loss = (logp * batch.loss_mask * batch.advantages[:, None]).sum()
        loss.backward()
        return loss.item()

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = rss_bytes()
    cuda_before = torch.cuda.memory_allocated() if device == "cuda" else 0
    times = []
    for _ in range(args.passes):
        start = time.perf_counter()
        loss = one_pass()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    out = {"variant": args.variant, "device": device, "loss": loss, "rss_peak": rss_bytes(),
           "rss_pass": rss_bytes() - rss_before, "s_per_pass": min(times),
           "completion_tokens": int(batch.completion_mask.sum())}
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        out.update(cuda_peak=peak, cuda_pass=peak - cuda_before)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens in the packed micro-batch")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=256, help="chunk_tokens of the chunked head")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--passes", type=int, default=1, help="forward+backward passes; the fastest is reported")
    parser.add_argument("--variant", choices=["direct", "chunked"], help=argparse.SUPPRESS)  # set in the child
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return

    results = []
    for variant in ("direct", "chunked"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    direct, chunked = results
    print(f"vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, {args.tokens} tokens "
          f"({direct['completion_tokens']} completion), chunk {args.chunk}, device {direct['device']}")
    cols = [("rss_peak", "RSS peak"), ("rss_pass", "RSS pass")]
    if "cuda_peak" in direct:
        cols += [("cuda_peak", "CUDA peak"), ("cuda_pass", "CUDA pass")]
    print(f"{'variant':<15}" + "".join(f"{title + ' GiB':>15}" for _, title in cols) + f"{'s/pass':>9}{'loss':>14}")
    for r in results:
        print(f"{r['variant']:<15}" + "".join(f"{r[key] / GIB:>15.2f}" for key, _ in cols)
              + f"{r['s_per_pass']:>9.2f}{r['loss']:>14.4f}")
    print(f"{'direct/chunked':<15}" + "".join(f"{direct[key] / max(chunked[key], 1):>14.1f}x" for key, _ in cols))
    if abs(direct["loss"] - chunked["loss"]) > 1e-4 * max(1.0, abs(direct["loss"])):
        sys.exit(f"the two forms disagree: {direct['loss']} vs {chunked['loss']}")


if __name__ == "__main__":
    main()
