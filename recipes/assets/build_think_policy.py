"""Rebuild the tiny thinking policy in recipes/assets/tiny-qwen2-think/ from scratch, offline:
the Step-GRPO testbed's policy (spec: ../shared/specs/ALGORITHMS.md §4; docs/architecture.md,
Step-GRPO).

It writes ``<think> ... </think>`` traces with a random number (0-4) of redundant "Wait, let me
check" steps, as in recipes/assets/synth_think.py, so that Step-GRPO's step reward has steps to
remove, and its truncated rollout has a probe to ask: after any line of thinking, the appended
``\\n**Final Answer**\\n\\boxed`` is continued greedily with ``{N}\\n</think>``.

1. Generate a pretraining set with synth_think.py (its own seed; no problem of the shipped
   train/eval sets).
2. Train the tokenizer of build_tiny_policy.py (byte-level BPE, Qwen2's normalizer and
   pre-tokenizer, saved as a Qwen2Tokenizer) plus ``<think>`` and ``</think>`` as single,
   non-special added tokens (as in Qwen3: they survive ``skip_special_tokens=True`` decoding).
3. Pretrain a tiny ``Qwen2ForCausalLM`` with build_tiny_policy.py's loop on prompt
   ``"Question: {problem}\\nAnswer:"`` and target ``" {solution}<|endoftext|>"``, loss on the
   target only, batches grouped by length (``--bucket``). The truncated rollout appends its
   inserted texts (the probe, and ``\\n</think>\\n\\n`` at an early exit) as token ids after the
   sampled ones, so the tokens meeting there are not those of the whole text (``.\\n`` +
   ``\\n`` + ``**``, where the text gives ``.\\n\\n`` + ``**``), and an early exit leaves a
   thinking block without the answer block. So that the policy meets neither for the first
   time in RL, a share of the pretraining targets (``--split-rate``) is encoded in two pieces
   cut just before the ``\\n**Final Answer**`` block, as the probe makes it, and a share of the
   rows (``--exit-rate``) is laid out as after an early exit, with the answer as the only target.
4. Save model (safetensors), tokenizer and generation config, then measure on the shipped eval
   set: accuracy, format, "Wait" steps and length (greedy on all rows, and T=1.0 with 8 samples
   on the first 50), the probe after the first solution line and at the first "Wait" of the
   samples (greedy continuation, strict confidence), and the answer after an early exit.

    python recipes/assets/build_think_policy.py            # writes recipes/assets/tiny-qwen2-think/

Deterministic: the same arguments give a byte-identical model.safetensors.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.assets.build_tiny_policy import (  # noqa: E402
    format_prompt, generate_answers, make_model, pretrain, train_tokenizer,
)
from recipes.assets.synth_gsm8k import read_jsonl  # noqa: E402
from recipes.assets.synth_think import (  # noqa: E402
    OUT_DIR as DATA_DIR, PROBE, TRIGGER, boxed_answer, count_triggers, generate, solution_lines,
)

OUT_DIR = Path(__file__).resolve().parent / "tiny-qwen2-think"
THINK, THINK_END = "<think>", "</think>"
ANSWER_TEXT = "\n</think>\n\n"  # what the truncated rollout appends when a probe exits early
PROBE_TOKENS = 20  # the spec's probe budget
MAX_NEW_TOKENS = 192  # completions: the longest shipped target is ~145 tokens


# ----------------------------------------------------------------------------- data


def encode_example(tok, row: dict, split: bool) -> tuple[list[int], int]:
    """Token ids of prompt + target, and the number of prompt tokens; with ``split`` the target is
    encoded in two pieces cut before the ``\\n**Final Answer**`` block, as the probe meets it."""
    prompt = tok(format_prompt(row["problem"]))["input_ids"]
    target = " " + row["solution"]
    cut = target.index(PROBE) if split else len(target)
    ids = tok(target[:cut])["input_ids"] + (tok(target[cut:])["input_ids"] if split else [])
    return prompt + ids + [tok.eos_token_id], len(prompt)


def encode_exit_example(tok, row: dict, rng: random.Random) -> tuple[list[int], int]:
    """The rollout's layout after an early exit, as token ids: the trace cut after a random line
    at which it holds the final answer (the last solution line unless it is a wrong first
    attempt, or a later check), ``\\n</think>\\n\\n`` encoded on its own, then the answer line.
    Only the answer is target: the policy learns to answer there, not to close its thinking
    that way itself. Returns the ids and the number of tokens before the answer."""
    lines, n_steps = row["solution"].split("\n"), len(solution_lines(row))
    first = n_steps + (", not " in lines[n_steps + 1])
    cut = rng.randint(first, lines.index("") - 1)  # keep lines[: cut + 1]
    context = (tok(format_prompt(row["problem"]))["input_ids"]
               + tok(" " + "\n".join(lines[: cut + 1]) + "\n")["input_ids"] + tok(ANSWER_TEXT)["input_ids"])
    return context + tok(lines[-1])["input_ids"] + [tok.eos_token_id], len(context)


# ----------------------------------------------------------------------------- evaluation


def first_line(row: dict) -> str:
    """The trace as sampled up to the first solution line's newline (completions start with a space)."""
    return f" {THINK}\n{solution_lines(row)[0]}\n"


def before_first_trigger(completion: str) -> str | None:
    """The completion up to its first "Wait", where the rollout's first probe comes, or None."""
    found = TRIGGER.search(completion)
    return completion[: found.start()] if found else None


def last_result(thinking: str) -> int | None:
    """The result of the last ``a op b = c`` written in ``thinking``."""
    found = re.findall(r"= (\d+)", thinking)
    return int(found[-1]) if found else None


@torch.no_grad()
def greedy_continuations(model, tok, prefixes: list[list[int]], *, max_new_tokens: int, stop_ids: list[int],
                         batch_size: int = 100) -> list[tuple[list[int], list[float]]]:
    """Greedy continuation of each token-id prefix (up to and including a stop id), with the
    probability of each generated token."""
    out = []
    for i in range(0, len(prefixes), batch_size):
        chunk = prefixes[i : i + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stop_ids, pad_token_id=tok.pad_token_id,
                             output_logits=True, return_dict_in_generate=True)
        probs = torch.stack(gen.logits, 1).softmax(-1).max(-1).values  # greedy: the chosen token is top-1
        for j, seq in enumerate(gen.sequences[:, width:].tolist()):
            n = next((k + 1 for k, t in enumerate(seq) if t in stop_ids), len(seq))
            out.append((seq[:n], probs[j, :n].tolist()))
    return out


def _prefixes(tok, rows: list[dict], thinking: list[str], inserted: str) -> list[list[int]]:
    """Prompt, thinking and inserted text as the rollout joins them: token ids, each part encoded alone."""
    return [tok(format_prompt(r["problem"]))["input_ids"] + tok(t)["input_ids"] + tok(inserted)["input_ids"]
            for r, t in zip(rows, thinking)]


def probe(model, tok, rows: list[dict], thinking: list[str]) -> list[dict]:
    """Step-GRPO's probe after each thinking text (a completion's start ``" <think>\\n...\\n"``):
    whether its greedy continuation closed with ``</think>``, its strict confidence (geometric
    mean of the top-1 probabilities, the first token skipped; 0 unless closed), whether it is
    exactly ``{N}\\n</think>`` with the right N, and whether the thinking's last result is right."""
    stop = [tok.convert_tokens_to_ids(THINK_END), tok.eos_token_id]
    outs = greedy_continuations(model, tok, _prefixes(tok, rows, thinking, PROBE), max_new_tokens=PROBE_TOKENS,
                                stop_ids=stop)
    results = []
    for row, text, (ids, probs) in zip(rows, thinking, outs):
        closed = ids[-1] == stop[0]
        truth = row["reward_model"]["ground_truth"]
        results.append({
            "closed": closed,
            "conf": math.exp(statistics.fmean(map(math.log, probs[1:]))) if closed and len(ids) > 1 else 0.0,
            "right": tok.decode(ids) == f"{{{truth}}}\n{THINK_END}",
            "last_right": last_result(text) == int(truth),
        })
    return results


def answers_after_exit(model, tok, rows: list[dict], thinking: list[str]) -> list[bool]:
    """Whether the greedy answer is right after an early exit after each thinking text: the
    rollout drops the probe, appends ``\\n</think>\\n\\n`` and lets the policy answer."""
    outs = greedy_continuations(model, tok, _prefixes(tok, rows, thinking, ANSWER_TEXT), max_new_tokens=24,
                                stop_ids=[tok.eos_token_id])
    return [boxed_answer(tok.decode(ids)) == int(r["reward_model"]["ground_truth"]) for (ids, _), r in zip(outs, rows)]


def completion_stats(completions: list[str], rows: list[dict], tok) -> dict:
    """Accuracy, format, "Wait" count and length of completions (``len(completions) // len(rows)`` per row)."""
    k = len(completions) // len(rows)
    truths = [int(r["reward_model"]["ground_truth"]) for r in rows for _ in range(k)]
    right = [boxed_answer(c) == t for c, t in zip(completions, truths)]
    waits = [count_triggers(c) for c in completions]
    formatted = [c.lstrip().startswith(THINK) and c.count(THINK_END) == 1 and
                 boxed_answer(c.split(THINK_END)[1] if THINK_END in c else "") is not None for c in completions]
    return {
        "accuracy": statistics.fmean(right),
        f"pass@{k}": statistics.fmean(any(right[i : i + k]) for i in range(0, len(right), k)),
        "format": statistics.fmean(formatted),
        "waits": statistics.fmean(waits),
        "tokens": statistics.fmean(len(tok(c)["input_ids"]) + 1 for c in completions),
        "accuracy with 0 Wait": statistics.fmean([r for r, w in zip(right, waits) if not w] or [math.nan]),
        "accuracy with >=1 Wait": statistics.fmean([r for r, w in zip(right, waits) if w] or [math.nan]),
        "Wait counts 0..4+": [sum(min(w, 4) == n for w in waits) for n in range(5)],
    }


def _line(stats: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())


def _probe_line(results: list[dict]) -> str:
    if not results:
        return "none"
    confs = [p["conf"] for p in results]
    confident = [p for p in results if p["conf"] > 0.95]
    return (f"{len(results)}: closed {statistics.fmean(p['closed'] for p in results):.3f}, "
            f"'{{N}}\\n</think>' right {statistics.fmean(p['right'] for p in results):.3f}, "
            f"conf > 0.95 {len(confident) / len(results):.3f} (right among them "
            f"{statistics.fmean([p['right'] for p in confident] or [math.nan]):.3f}), "
            f"conf quartiles {' '.join(f'{q:.3f}' for q in statistics.quantiles(confs, n=4))}")


def report(model, tok, shipped_eval: list[dict], seed: int) -> None:
    """Print the measurements of the README's table."""
    questions = [r["problem"] for r in shipped_eval]
    greedy = [o[0] for o in generate_answers(model, tok, questions, max_new_tokens=MAX_NEW_TOKENS)]
    print(f"greedy, {len(shipped_eval)} eval rows: {_line(completion_stats(greedy, shipped_eval, tok))}")
    torch.manual_seed(seed)
    rows = [r for r in shipped_eval[:50] for _ in range(8)]
    sampled = [c for o in generate_answers(model, tok, questions[:50], num_samples=8, temperature=1.0,
                                           max_new_tokens=MAX_NEW_TOKENS) for c in o]
    print(f"T=1.0, first 50 eval rows x 8: {_line(completion_stats(sampled, shipped_eval[:50], tok))}")
    print(f"data, {len(shipped_eval)} eval rows: {_line(completion_stats([' ' + r['solution'] for r in shipped_eval], shipped_eval, tok))}")

    probes = probe(model, tok, shipped_eval, [first_line(r) for r in shipped_eval])
    one_step = [len(solution_lines(r)) == 1 for r in shipped_eval]
    print(f"probe after the first solution line, all {_probe_line(probes)}")
    print(f"  one-step, line right {_probe_line([p for p, o in zip(probes, one_step) if o and p['last_right']])}")
    print(f"  one-step, line wrong {_probe_line([p for p, o in zip(probes, one_step) if o and not p['last_right']])}")
    print(f"  two-step (after step 1) {_probe_line([p for p, o in zip(probes, one_step) if not o])}")
    cut = [(r, t) for r, c in zip(rows, sampled) if (t := before_first_trigger(c)) is not None]
    probes = probe(model, tok, [r for r, _ in cut], [t for _, t in cut])
    print(f"probe at the first Wait of the T=1.0 samples, all {_probe_line(probes)}")
    print(f"  last result right {_probe_line([p for p in probes if p['last_right']])}")
    print(f"  last result wrong {_probe_line([p for p in probes if not p['last_right']])}")
    exits = answers_after_exit(model, tok, [r for r, _ in cut], [t for _, t in cut])
    print(f"answer after an early exit at the first Wait of the T=1.0 samples: accuracy {statistics.fmean(exits):.3f}, "
          f"when the last result is right {statistics.fmean(e for e, p in zip(exits, probes) if p['last_right']):.3f}")


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(OUT_DIR))
    ap.add_argument("--data", default=str(DATA_DIR), help="folder with the shipped train/eval.jsonl")
    ap.add_argument("--seed", type=int, default=1234, help="seed of the pretraining set and of the model")
    ap.add_argument("--pretrain-rows", type=int, default=30000)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--bucket", type=int, default=8, help="batches drawn at a time and grouped by length")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--split-rate", type=float, default=0.4,
                    help="share of pretraining targets encoded in two pieces at the probe's boundary")
    ap.add_argument("--exit-rate", type=float, default=0.15,
                    help="share of pretraining rows in the early-exit layout (loss on the answer only)")
    ap.add_argument("--no-eval", action="store_true", help="skip the measurements after saving")
    ap.add_argument("--eval-only", action="store_true", help="only measure the policy already in --out")
    args = ap.parse_args(argv)

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    shipped_train = read_jsonl(Path(args.data) / "train.jsonl")
    shipped_eval = read_jsonl(Path(args.data) / "eval.jsonl")
    if args.eval_only:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
        report(model, AutoTokenizer.from_pretrained(args.out), shipped_eval, args.seed)
        return
    held_out = {r["problem"] for r in shipped_train + shipped_eval}
    rows = generate(args.pretrain_rows, args.seed, exclude=held_out)
    print(f"pretraining set: {len(rows)} rows (seed {args.seed}), none from the shipped train/eval sets, "
          f"mean {statistics.fmean(count_triggers(r['solution']) for r in rows):.2f} 'Wait' per trace")

    tok = train_tokenizer([format_prompt(r["problem"]) + " " + r["solution"] for r in rows], args.vocab_size,
                          added_tokens=[THINK, THINK_END])
    print(f"tokenizer: {len(tok)} tokens, {THINK} {tok.convert_tokens_to_ids(THINK)}, "
          f"{THINK_END} {tok.convert_tokens_to_ids(THINK_END)}")
    layout_rng = random.Random(args.seed + 1)
    examples = []
    for row in rows:
        u = layout_rng.random()
        examples.append(encode_exit_example(tok, row, layout_rng) if u < args.exit_rate else
                        encode_example(tok, row, split=u < args.exit_rate + args.split_rate))
    print(f"examples: {statistics.fmean(len(ids) for ids, _ in examples):.1f} tokens on average, "
          f"{max(len(ids) for ids, _ in examples)} at most")

    model = make_model(len(tok), tok.eos_token_id, args.layers, args.intermediate)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, {args.layers} layers")

    pretrain(model, examples, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
             bucket=args.bucket)

    from transformers import GenerationConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    print(f"saved to {out} after {time.time() - t_start:.0f}s")

    if not args.no_eval:
        report(model, tok, shipped_eval, args.seed)
        print(f"build and measurements: {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
