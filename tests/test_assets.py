"""The shipped assets: synthetic GSM8K data, the tiny policy's tokenizer and model, and the same
for the thinking policy of the Step-GRPO testbed (no vLLM here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from recipes.assets import synth_gsm8k as sg
from recipes.assets import synth_think as st

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


# ----------------------------------------------------------------------------- the thinking policy (Step-GRPO)

THINK_DATA = ASSETS / "synth_think"
THINK_MODEL = ASSETS / "tiny-qwen2-think"
_ARITH = re.compile(r"(\d+) ([-+*/]) (\d+) (?:=|really|is) (\d+)")  # "a op b = c", "is a op b really c"


def _right(a: str, op: str, b: str, c: str) -> bool:
    a, b, c = int(a), int(b), int(c)
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op] == c


def _check_think_row(row: dict) -> tuple[int, bool]:
    """The trace's layout and arithmetic; returns (number of "Wait" lines, whether it corrects itself)."""
    assert set(row) == {"problem", "solution", "reward_model"} and set(row["reward_model"]) == {"ground_truth"}
    n = int(row["reward_model"]["ground_truth"])
    lines = row["solution"].split("\n")
    assert lines[0] == "<think>"
    assert lines[-6:] == ["", "**Final Answer**", f"\\boxed{{{n}}}", "</think>", "", f"The answer is \\boxed{{{n}}}."]
    body = lines[1:-6]
    waits = [i for i, line in enumerate(body) if "Wait" in line]
    assert all(body[i].startswith("Wait, ") and body[i].count("Wait") == 1 for i in waits), row
    assert st.count_triggers(row["solution"]) == row["solution"].count("Wait") == len(waits)  # never "Waiting"
    assert "Wait" not in row["problem"]
    steps = body[: waits[0]] if waits else body
    assert 1 <= len(steps) <= 2 and body[len(steps):] == [body[i] for i in waits]  # all checks after the steps
    assert all(_right(*m) for line in steps[:-1] for m in _ARITH.findall(line))
    a, op, b, c = _ARITH.findall(steps[-1])[-1]
    corrected = not _right(a, op, b, c)
    if corrected:  # the first attempt is off by 1-3, and the next line says so
        assert 1 <= abs(int(c) - n) <= 3 and f", not {c}" in body[len(steps)], row
    else:
        assert int(c) == n
    for line in body[len(steps):]:
        found = _ARITH.findall(line)
        assert found and all(_right(*m) for m in found) and n in {int(x) for m in found for x in m if x.isdigit()}, row
    assert len(waits) <= st.MAX_CHECKS
    assert st.boxed_answer(row["solution"]) == n
    return len(waits), corrected


def test_think_generator_is_deterministic_and_traces_parse():
    train_a, eval_a = st.generate_split(1000, 100, seed=3)
    assert (train_a, eval_a) == st.generate_split(1000, 100, seed=3)
    assert st.generate_split(1000, 100, seed=4)[0] != train_a
    assert not {r["problem"] for r in train_a} & {r["problem"] for r in eval_a}
    assert len({r["problem"] for r in train_a}) == 1000
    stats = [_check_think_row(row) for row in train_a + eval_a]
    waits = [w for w, _ in stats]
    assert set(waits) == {0, 1, 2, 3, 4}
    assert 1.8 < sum(waits) / len(waits) < 2.3
    assert 0.1 < sum(c for _, c in stats) / len(stats) < 0.2
    assert {len(st.solution_lines(r)) for r in train_a} == {1, 2}


def test_think_helpers():
    assert st.count_triggers("Wait, x.\nWaiting. Await. wait. (Wait) Waited") == 2
    assert st.boxed_answer("\\boxed{3} then \\boxed{-12}.") == -12
    assert st.boxed_answer("\\boxed{x}") is None and st.boxed_answer("12") is None


def test_think_cli_and_shipped_data(tmp_path):
    st.main(["--out", str(tmp_path), "--train", "40", "--eval", "10", "--seed", "5"])
    written = sg.read_jsonl(tmp_path / "train.jsonl"), sg.read_jsonl(tmp_path / "eval.jsonl")
    assert written == st.generate_split(40, 10, seed=5)
    train, evals = sg.read_jsonl(THINK_DATA / "train.jsonl"), sg.read_jsonl(THINK_DATA / "eval.jsonl")
    assert (train, evals) == st.generate_split(2000, 200, seed=0)  # the CLI's defaults
    assert not {r["problem"] for r in train} & {r["problem"] for r in evals}
    for row in train + evals:
        _check_think_row(row)


@pytest.fixture(scope="module")
def think_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(THINK_MODEL)


def test_think_tokenizer(think_tokenizer, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = think_tokenizer
    assert type(tok).__name__ == "Qwen2Tokenizer" and tok.eos_token_id == tok.pad_token_id == 0
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    think, end = tok.convert_tokens_to_ids(["<think>", "</think>"])
    assert tok("<think>")["input_ids"] == [think] and tok("x</think>\n")["input_ids"][1] == end
    assert "<think>" not in tok.all_special_tokens and "</think>" not in tok.all_special_tokens

    raw = Tokenizer.from_file(str(THINK_MODEL / "tokenizer.json"))
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    rows = sg.read_jsonl(THINK_DATA / "eval.jsonl")[:20]
    for text in [f"Question: {r['problem']}\nAnswer: {r['solution']}<|endoftext|>" for r in rows]:
        ids = tok(text)["input_ids"]
        assert ids == reloaded(text)["input_ids"] == raw.encode(text).ids
        assert ids.count(think) == ids.count(end) == 1
        assert tok.decode(ids) == text
        # <think> and </think> are not special: kept when special tokens are skipped (as vLLM's detokenizer does)
        assert tok.decode(ids, skip_special_tokens=True) == text.removesuffix("<|endoftext|>")


def test_think_model_files():
    config = json.loads((THINK_MODEL / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"]
    assert config["hidden_size"] // config["num_attention_heads"] == 32  # vLLM CPU head_dim
    assert config["max_position_embeddings"] == 512
    assert (THINK_MODEL / "model.safetensors").stat().st_size < 5_000_000
    assert json.loads((THINK_MODEL / "generation_config.json").read_text())["eos_token_id"] == 0


def test_think_model_behaviour(think_tokenizer):
    """Greedy completions are formatted traces with redundant checks; after a right solution line
    the probe closes the thinking with the boxed answer, confidently, and so does an early exit."""
    import torch
    from transformers import AutoModelForCausalLM

    from recipes.assets import build_think_policy as bt
    from recipes.assets.build_tiny_policy import generate_answers

    torch.set_num_threads(1)
    tok = think_tokenizer
    model = AutoModelForCausalLM.from_pretrained(THINK_MODEL, dtype=torch.float32).eval()
    rows = sg.read_jsonl(THINK_DATA / "eval.jsonl")[:20]
    completions = [o[0] for o in generate_answers(model, tok, [r["problem"] for r in rows],
                                                  max_new_tokens=bt.MAX_NEW_TOKENS)]
    stats = bt.completion_stats(completions, rows, tok)
    assert stats["format"] == 1.0 and 0.2 < stats["accuracy"] < 0.95 and stats["waits"] >= 1, stats

    # one-step problems, probed (and exited) right after their solution line
    rows = [r for r in sg.read_jsonl(THINK_DATA / "eval.jsonl") if len(st.solution_lines(r)) == 1][:20]
    thinking = [bt.first_line(r) for r in rows]
    probes = bt.probe(model, tok, rows, thinking)
    assert all(p["closed"] for p in probes)
    right = [p for p in probes if p["last_right"]]
    assert len(right) >= 10 and all(p["right"] and p["conf"] > 0.95 for p in right)
    exits = bt.answers_after_exit(model, tok, rows, thinking)
    assert all(e for e, p in zip(exits, probes) if p["last_right"])
