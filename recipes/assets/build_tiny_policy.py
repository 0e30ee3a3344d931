"""Rebuild the tiny Qwen2 policy in recipes/assets/tiny-qwen2/ from scratch, offline.

1. Generate a pretraining set of synthetic GSM8K problems (its own seed; no question of the
   shipped train/eval sets).
2. Train a byte-level BPE tokenizer with Qwen2's exact normalizer and pre-tokenizer, so that
   ``AutoTokenizer.from_pretrained`` (which returns ``Qwen2Tokenizer``) gives identical ids.
3. Pretrain a tiny ``Qwen2ForCausalLM`` with plain torch on the RL prompt format
   (prompt ``"Question: {q}\\nAnswer:"``, target ``" {answer}<|endoftext|>"``, loss on the
   target only). A fraction of the pretraining answers (``--slip-rate``) keep the right worked
   solution but end on a wrong ``#### N`` line (the question's first number), so the
   pretrained policy often computes the answer and then reports the wrong one: a behaviour it
   already has both ways, which RL can sharpen within minutes (like answer-format and
   answer-selection errors of real pretrained models), on top of arithmetic it gets partly right.
4. Save model (safetensors), tokenizer and generation config, then report greedy accuracy
   and pass@8 at temperature 1 on the shipped eval set.

    python recipes/assets/build_tiny_policy.py            # writes recipes/assets/tiny-qwen2/
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

if __package__ in (None, ""):  # run as a script: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.assets.synth_gsm8k import extract_answer, generate, read_jsonl  # noqa: E402

ASSETS = Path(__file__).resolve().parent
DATA_DIR = ASSETS / "synth_gsm8k"
OUT_DIR = ASSETS / "tiny-qwen2"

EOS = "<|endoftext|>"
MAX_LEN = 512
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def format_prompt(question: str) -> str:
    """The RL prompt format; the completion starts with a space."""
    return f"Question: {question}\nAnswer:"


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, added_tokens: Sequence[str] = ()):
    """Byte-level BPE with Qwen2's normalizer/pre-tokenizer, wrapped as a Qwen2Tokenizer.

    ``added_tokens`` (e.g. ``<think>``, ``</think>``) get ids after the trained vocabulary and are
    not special, as in Qwen3: each encodes to one id and survives ``skip_special_tokens=True``
    decoding. BPE training sees the texts split around them, as encoding does.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = texts
    if added_tokens:
        split = re.compile("|".join(map(re.escape, added_tokens)))
        corpus = [piece for text in texts for piece in split.split(text)]
    bpe.train_from_iterator(corpus, trainer)
    added = [AddedToken(t, special=False, normalized=False) for t in added_tokens]
    bpe.add_tokens(added)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # Build the tokenizer through Qwen2Tokenizer itself: what is saved is what reloads.
    tok = Qwen2Tokenizer(
        vocab=model["vocab"], merges=merges, eos_token=EOS, pad_token=EOS, unk_token=EOS,
        model_max_length=MAX_LEN,
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tok.add_tokens(added)
    tok.chat_template = CHAT_TEMPLATE
    for text in texts[:200]:  # the wrapper must not change the trained tokenization
        assert tok(text)["input_ids"] == bpe.encode(text).ids
    return tok


# ----------------------------------------------------------------------------- model / data


def make_model(vocab_size: int, eos_id: int, layers: int, intermediate: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,  # head_dim 32: supported by vLLM's CPU attention
        num_key_value_heads=2,
        max_position_embeddings=MAX_LEN,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        use_sliding_window=False,
        torch_dtype="float32",
    )
    return Qwen2ForCausalLM(config).float()


def with_slip(row: dict) -> dict:
    """The same worked solution, but a final ``#### N`` that repeats the question's first number."""
    head, _, final = row["answer"].rpartition("#### ")
    first = re.search(r"\d+", row["question"])
    return {**row, "answer": f"{head}#### {first.group()}"} if first and first.group() != final.strip() else row


def encode_example(tok, row: dict) -> tuple[list[int], int]:
    """Token ids of prompt + target, and the number of prompt tokens."""
    prompt = tok(format_prompt(row["question"]))["input_ids"]
    target = tok(" " + row["answer"])["input_ids"] + [tok.eos_token_id]
    return prompt + target, len(prompt)


def make_batch(examples: list[tuple[list[int], int]], pad_id: int):
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        mask[i, : len(ids)] = 1
    return input_ids, labels, mask


def pretrain(model, examples, *, steps: int, batch_size: int, lr: float, seed: int, log_every: int = 100,
             bucket: int = 1):
    """AdamW on shuffled batches, the loss a mean over target tokens.

    With ``bucket`` > 1, ``bucket`` batches are drawn at a time and formed from examples of similar
    length, in shuffled order: less padding for long examples. Their losses are then divided by
    the mean number of target tokens of those batches, not each by its own, so that a token of a
    short example weighs no more than one of a long example, as without bucketing.
    """
    rng = random.Random(seed)
    pad_id = model.config.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))

    model.train()
    order: list[int] = []
    batches: list[list] = []
    t0, running = time.time(), 0.0
    for step in range(steps):
        if not batches:
            if len(order) < batch_size * bucket:
                order += rng.sample(range(len(examples)), len(examples))
            drawn = [examples[order.pop()] for _ in range(batch_size * bucket)]
            loss_kwargs = {}
            if bucket > 1:
                drawn.sort(key=lambda example: len(example[0]))
                loss_kwargs["num_items_in_batch"] = sum(len(ids) - n_prompt for ids, n_prompt in drawn) / bucket
            batches = [drawn[i : i + batch_size] for i in range(0, len(drawn), batch_size)]
            rng.shuffle(batches)  # one batch: draws nothing from rng
        batch = batches.pop()
        input_ids, labels, mask = make_batch(batch, pad_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels, **loss_kwargs).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            print(f"step {step + 1}/{steps}  loss {running / n:.4f}  lr {lr_at(step):.2e}  "
                  f"{time.time() - t0:.0f}s", flush=True)
            running = 0.0
    model.eval()


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def generate_answers(model, tok, questions: list[str], *, num_samples: int = 1, temperature: float = 0.0,
                     max_new_tokens: int = 64, batch_size: int = 64) -> list[list[str]]:
    """Completions (``num_samples`` per question), greedy when temperature is 0."""
    tok.padding_side = "left"
    sampling = temperature > 0
    out: list[list[str]] = []
    for i in range(0, len(questions), batch_size):
        prompts = [format_prompt(q) for q in questions[i : i + batch_size]]
        enc = tok(prompts, return_tensors="pt", padding=True)
        gen = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=sampling,
            num_return_sequences=num_samples,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            **({"temperature": temperature, "top_k": 0, "top_p": 1.0} if sampling else {}),
        )
        texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out += [texts[j : j + num_samples] for j in range(0, len(texts), num_samples)]
    return out


def is_correct(completion: str, reference_answer: str) -> bool:
    pred = extract_answer(completion)
    return pred is not None and pred == extract_answer(reference_answer)


def greedy_accuracy(model, tok, rows: list[dict]) -> float:
    outs = generate_answers(model, tok, [r["question"] for r in rows])
    return sum(is_correct(o[0], r["answer"]) for o, r in zip(outs, rows)) / len(rows)


def pass_at_k(model, tok, rows: list[dict], k: int = 8, temperature: float = 1.0, seed: int = 0):
    """(pass@k, mean per-sample accuracy) with k samples per question."""
    torch.manual_seed(seed)
    outs = generate_answers(model, tok, [r["question"] for r in rows], num_samples=k, temperature=temperature)
    hits = [[is_correct(c, r["answer"]) for c in o] for o, r in zip(outs, rows)]
    return sum(any(h) for h in hits) / len(rows), sum(map(sum, hits)) / (k * len(rows))


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(OUT_DIR))
    ap.add_argument("--data", default=str(DATA_DIR), help="folder with the shipped train/eval.jsonl")
    ap.add_argument("--seed", type=int, default=1234, help="seed of the pretraining set and of the model")
    ap.add_argument("--pretrain-rows", type=int, default=30000)
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slip-rate", type=float, default=0.5,
                    help="fraction of pretraining answers whose final #### line is wrong")
    args = ap.parse_args(argv)

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    shipped_train = read_jsonl(Path(args.data) / "train.jsonl")
    shipped_eval = read_jsonl(Path(args.data) / "eval.jsonl")
    held_out = {r["question"] for r in shipped_train + shipped_eval}
    rows = generate(args.pretrain_rows, args.seed, exclude=held_out)
    slip_rng = random.Random(args.seed + 1)
    rows = [with_slip(r) if slip_rng.random() < args.slip_rate else r for r in rows]
    print(f"pretraining set: {len(rows)} rows (seed {args.seed}), none from the shipped train/eval sets, "
          f"{args.slip_rate:.0%} with a wrong final line")

    tok = train_tokenizer([format_prompt(r["question"]) + " " + r["answer"] for r in rows], args.vocab_size)
    print(f"tokenizer: {len(tok)} tokens")
    examples = [encode_example(tok, r) for r in rows]

    model = make_model(len(tok), tok.eos_token_id, args.layers, args.intermediate)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, {args.layers} layers")

    pretrain(model, examples, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)

    from transformers import GenerationConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    print(f"saved to {out}")

    acc = greedy_accuracy(model, tok, shipped_eval)
    p8, mean_t1 = pass_at_k(model, tok, shipped_eval[:50], k=8, temperature=1.0, seed=args.seed)
    print(f"greedy accuracy on {len(shipped_eval)} eval rows: {acc:.3f}")
    print(f"T=1.0 on first 50 eval rows: pass@8 {p8:.3f}, mean accuracy per sample {mean_t1:.3f}")
    print(f"build time: {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
