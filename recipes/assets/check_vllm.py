"""Check that the tiny policy loads in vLLM and that vLLM's greedy tokens equal transformers'.

    python recipes/assets/check_vllm.py [--model recipes/assets/tiny-qwen2] [--n 8]

Exits non-zero on a mismatch. vLLM takes ~20 s to start on CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from recipes.assets.build_tiny_policy import DATA_DIR, OUT_DIR, format_prompt  # noqa: E402
from recipes.assets.synth_gsm8k import read_jsonl  # noqa: E402


def hf_greedy(model_dir: str, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:  # one at a time: no padding in the comparison
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            out.append(gen[0, ids.shape[1]:].tolist())
    return out


def vllm_greedy(model_dir: str, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(OUT_DIR))
    ap.add_argument("--data", default=str(DATA_DIR / "eval.jsonl"))
    ap.add_argument("--n", type=int, default=16, help="number of eval prompts")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()

    prompts = [format_prompt(r["question"]) for r in read_jsonl(args.data)[: args.n]]
    hf = hf_greedy(args.model, prompts, args.max_new_tokens)
    vl = vllm_greedy(args.model, prompts, args.max_new_tokens)
    mismatches = 0
    for i, (a, b) in enumerate(zip(hf, vl)):
        same = a == b  # both end with the eos token when they stop on it
        mismatches += not same
        print(f"[{i}] {'OK  ' if same else 'DIFF'} hf={a}\n       vllm={b}")
    print(f"{len(prompts) - mismatches}/{len(prompts)} prompts: vLLM greedy == transformers greedy")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
