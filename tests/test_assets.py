"""The shipped assets: synthetic GSM8K data, the tiny policy's tokenizer and model (no vLLM here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from recipes.assets import synth_gsm8k as sg

ASSETS = Path(__file__).resolve().parents[1] / "recipes" / "assets"
DATA = ASSETS / "synth_gsm8k"
MODEL = ASSETS / "tiny-qwen2"


def _check_row(row: dict) -> None:
    """Every `a op b = c` in the worked solution is right, and `#### N` is the last result."""
    assert set(row) == {"question", "answer"}
    solution, final = row["answer"].split("\n#### ")
    steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", solution)
    assert steps, row
    for a, op, b, c in steps:
        a, b, c = int(a), int(b), int(c)
        assert {"+": a + b, "-": a - b, "*": a * b}[op] == c, row
        assert c >= 0
    assert sg.extract_answer(row["answer"]) == int(final) == int(steps[-1][3])


def test_generator_is_deterministic_and_rows_parse():
    train_a, eval_a = sg.generate_split(300, 50, seed=3)
    train_b, eval_b = sg.generate_split(300, 50, seed=3)
    assert train_a == train_b and eval_a == eval_b
    assert sg.generate_split(300, 50, seed=4)[0] != train_a
    assert not {r["question"] for r in train_a} & {r["question"] for r in eval_a}
    assert len({r["question"] for r in train_a}) == 300
    for row in train_a + eval_a:
        _check_row(row)
    # +, - and * all occur, in one- and two-step problems
    ops = {" ".join(re.findall(r" ([-+*]) ", r["answer"])) for r in train_a}
    assert {"+", "-", "*", "+ -", "* +"} <= ops


def test_cli_writes_disjoint_files(tmp_path):
    sg.main(["--out", str(tmp_path), "--train", "40", "--eval", "10", "--seed", "5"])
    train, evals = sg.read_jsonl(tmp_path / "train.jsonl"), sg.read_jsonl(tmp_path / "eval.jsonl")
    assert (len(train), len(evals)) == (40, 10)
    assert (train, evals) == sg.generate_split(40, 10, seed=5)


def test_extract_answer():
    assert sg.extract_answer("x = 3.\n#### 12") == 12
    assert sg.extract_answer("#### 1,234") == 1234
    assert sg.extract_answer("#### 5\n#### 7 apples") == 7
    assert sg.extract_answer("no answer 12") is None
    assert sg.extract_answer("#### twelve") is None


def test_shipped_data():
    train, evals = sg.read_jsonl(DATA / "train.jsonl"), sg.read_jsonl(DATA / "eval.jsonl")
    assert (len(train), len(evals)) == (2000, 200)
    assert not {r["question"] for r in train} & {r["question"] for r in evals}
    for row in train + evals:
        _check_row(row)
    # reproducible from the generator's CLI defaults
    assert (train, evals) == sg.generate_split(2000, 200, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


def test_tokenizer_round_trip_and_reload(tokenizer, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert ids == [0, 1, 2] and tokenizer.eos_token_id == 0
    raw = Tokenizer.from_file(str(MODEL / "tokenizer.json"))  # what was trained and saved

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in sg.read_jsonl(DATA / "eval.jsonl")[:20]]
    texts += ["Unseen words, ünïcödé, 12345 + 6 = 12351!\n\n  tabs\tand spaces", "<|im_start|>user\nhi<|im_end|>\n"]
    for text in texts:
        enc = tokenizer(text)["input_ids"]
        assert enc == reloaded(text)["input_ids"] == raw.encode(text).ids
        assert tokenizer.decode(enc) == text

    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_model_files():
    config = json.loads((MODEL / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"]
    assert config["hidden_size"] // config["num_attention_heads"] == 32  # vLLM CPU head_dim
    assert (MODEL / "model.safetensors").stat().st_size < 5_000_000
    assert json.loads((MODEL / "generation_config.json").read_text())["eos_token_id"] == 0


def test_model_greedy_accuracy(tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from recipes.assets.build_tiny_policy import greedy_accuracy

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    acc = greedy_accuracy(model, tokenizer, sg.read_jsonl(DATA / "eval.jsonl")[:50])
    assert 0.05 < acc < 0.8, acc
