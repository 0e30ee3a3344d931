"""Prompts (sampler, templates, encoding) and learner micro-batching, checked by hand."""
from __future__ import annotations

import json
import random
import re

import pytest

from launch.preflight import DataFileError
from launch.schema import DataConfig, DataSource
from rl.batching import padding_fraction, split_across_ranks, token_budget_microbatches
from rl.data import PromptSampler, check_columns, encode_prompts, load_rows, prompt_text, reference_answers

# ---------------------------------------------------------------- PromptSampler


def _draw(sampler: PromptSampler, count: int, times: int) -> list[int]:
    return [i for _ in range(times) for i in sampler.next(count)]


def test_sampler_is_deterministic_for_a_seed():
    a, b = PromptSampler(10, seed=3), PromptSampler(10, seed=3)
    assert _draw(a, 4, 8) == _draw(b, 4, 8)
    assert _draw(PromptSampler(10, seed=3), 4, 8) != _draw(PromptSampler(10, seed=4), 4, 8)


def test_each_epoch_is_a_permutation_and_epochs_reshuffle():
    n = 7
    sampler = PromptSampler(n, seed=0)
    seq = _draw(sampler, 3, 7)  # 21 draws of 3 from 7 prompts: exactly 3 epochs, batches straddle them
    epochs = [seq[k * n:(k + 1) * n] for k in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2], "every epoch must draw a new order"
    assert sampler.state_dict() == {"epoch": 2, "position": 7}


def test_a_draw_larger_than_the_data_spans_epochs():
    sampler = PromptSampler(4, seed=1)
    seq = sampler.next(9)
    assert len(seq) == 9
    assert sorted(seq[:4]) == sorted(seq[4:8]) == [0, 1, 2, 3]
    assert sampler.state_dict() == {"epoch": 2, "position": 1}
    assert all(type(i) is int for i in seq)


@pytest.mark.parametrize("draws_before", [1, 2, 3, 4, 5])  # 5 prompts, 2 per draw: mid-epoch and across
def test_resume_continues_the_exact_sequence(draws_before):
    reference = _draw(PromptSampler(5, seed=7), 2, 12)

    first = PromptSampler(5, seed=7)
    before = _draw(first, 2, draws_before)
    state = json.loads(json.dumps(first.state_dict()))  # the state goes into a JSON checkpoint

    resumed = PromptSampler(5, seed=7)
    resumed.next(3)  # whatever a fresh sampler did before loading must not matter
    resumed.load_state_dict(state)
    after = _draw(resumed, 2, 12 - draws_before)
    assert before + after == reference


def test_resume_exactly_at_an_epoch_boundary():
    reference = _draw(PromptSampler(6, seed=11), 3, 6)
    first = PromptSampler(6, seed=11)
    before = _draw(first, 3, 2)  # 6 of 6: the epoch is used up, the next one not yet drawn
    assert first.state_dict() == {"epoch": 0, "position": 6}
    resumed = PromptSampler(6, seed=11)
    resumed.load_state_dict(first.state_dict())
    assert before + _draw(resumed, 3, 4) == reference


def test_resume_in_a_later_epoch():
    reference = _draw(PromptSampler(4, seed=2), 3, 8)  # 24 draws = 6 epochs
    first = PromptSampler(4, seed=2)
    before = _draw(first, 3, 5)  # 15 draws: epoch 3, position 3
    assert first.state_dict() == {"epoch": 3, "position": 3}
    resumed = PromptSampler(4, seed=2)
    resumed.load_state_dict(first.state_dict())
    assert before + _draw(resumed, 3, 3) == reference


def test_sampler_rejects_an_empty_split():
    with pytest.raises(ValueError, match="no rows"):
        PromptSampler(0, seed=0)


# ---------------------------------------------------------------- prompts and encoding

WORDS = ["[UNK]", "<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
         "Question:", "Answer:", "2", "+", "3", "?", "7", "*", "Be", "brief."]
ID = {w: i for i, w in enumerate(WORDS)}
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer with a tiny chat template; it adds <s> when asked for special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(ID, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", ID["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>",
                                   chat_template=CHAT_TEMPLATE)


def data_config(**kw) -> DataConfig:
    return DataConfig(train=DataSource(path="train.jsonl"), eval=DataSource(path="eval.jsonl"), **kw)


ROWS = [{"question": "2 + 3 ?", "answer": "#### 5"}, {"question": "7 * 3 ?", "answer": "#### 21"}]


def ids(text: str) -> list[int]:
    return [ID[w] for w in text.split()]


def test_encode_without_chat_template(tokenizer):
    cfg = data_config(template="Question: {question}\nAnswer:", chat_template=False, system_prompt="Be brief.")
    assert prompt_text(tokenizer, cfg, "2 + 3 ?") == "Question: 2 + 3 ?\nAnswer:"  # no system prompt
    assert encode_prompts(tokenizer, cfg, ROWS) == [
        [6, 8, 9, 10, 11, 7],   # Question: 2 + 3 ? Answer:  (no <s>: special tokens are the template's job)
        [6, 12, 13, 10, 11, 7],  # Question: 7 * 3 ? Answer:
    ]


def test_encode_with_chat_template_and_system_prompt(tokenizer):
    cfg = data_config(chat_template=True, system_prompt="Be brief.")
    assert prompt_text(tokenizer, cfg, "2 + 3 ?") == \
        "<|system|> Be brief. <|end|> <|user|> 2 + 3 ? <|end|> <|assistant|>"
    assert encode_prompts(tokenizer, cfg, ROWS[:1]) == [[2, 14, 15, 5, 3, 8, 9, 10, 11, 5, 4]]


def test_encode_with_chat_template_without_system_prompt(tokenizer):
    cfg = data_config(template="Question: {question}", chat_template=True)
    assert encode_prompts(tokenizer, cfg, ROWS) == [
        ids("<|user|> Question: 2 + 3 ? <|end|> <|assistant|>"),
        ids("<|user|> Question: 7 * 3 ? <|end|> <|assistant|>"),
    ]
    assert encode_prompts(tokenizer, cfg, ROWS)[0] == [3, 6, 8, 9, 10, 11, 5, 4]


def test_long_prompts_are_left_truncated(tokenizer):
    cfg = data_config(chat_template=True, max_prompt_tokens=4)
    # full: <|user|> 2 + 3 ? <|end|> <|assistant|>; the end (the generation prompt) is kept
    assert encode_prompts(tokenizer, cfg, ROWS[:1]) == [[10, 11, 5, 4]]


def test_question_key_picks_the_column(tokenizer):
    cfg = data_config(question_key="problem", chat_template=False)
    assert encode_prompts(tokenizer, cfg, [{"problem": "7 * 3 ?", "question": "2 + 3 ?"}]) == [[12, 13, 10, 11]]


def test_question_key_reads_a_nested_field(tokenizer):
    cfg = data_config(question_key="prompt.0.content", chat_template=False)
    rows = [{"prompt": [{"role": "user", "content": "7 * 3 ?"}], "question": "2 + 3 ?"}]
    assert encode_prompts(tokenizer, cfg, rows) == [[12, 13, 10, 11]]


# ---------------------------------------------------------------- reference answers

MATH_SOLUTION = "We have $x = \\frac{1}{2} \\cdot 2 = 1$, so the answer is $\\boxed{\\frac{\\sqrt{3}}{2}}$."


@pytest.mark.parametrize("answer_format, field, expected", [
    ("gsm8k", "48/2 = 24 clips\n#### 1,234", "1234"),
    ("gsm8k", "  \\frac{1}{2} ", "\\frac{1}{2}"),          # no "####": stripped (MATH's answer column)
    ("gsm8k", 72, "72"),
    ("boxed", MATH_SOLUTION, "\\frac{\\sqrt{3}}{2}"),
    ("boxed", "first \\boxed{1}, then \\boxed{ (0, 1] }", "(0, 1]"),
    ("raw", "  (0, 1] \n", "(0, 1]"),
    ("raw", "reasoning\n#### 1,234", "reasoning\n#### 1,234"),
    ("raw", 2.5, "2.5"),
])
def test_reference_answer_formats(answer_format, field, expected):
    cfg = data_config(answer_format=answer_format)
    assert reference_answers(cfg, "train.jsonl", [{"answer": field}]) == [expected]


def test_default_answer_format_is_gsm8k():
    assert data_config().answer_format == "gsm8k"
    assert reference_answers(data_config(), "t", [{"answer": "x\n#### 5"}, {"answer": "7"}]) == ["5", "7"]


def test_boxed_answer_format_needs_a_box():
    cfg = data_config(answer_key="solution", answer_format="boxed")
    rows = [{"solution": MATH_SOLUTION}, {"solution": "the answer is \\boxed{5"}]
    with pytest.raises(DataFileError, match=r"train.jsonl: row 2: 'solution' has no complete \\boxed\{\} answer"):
        reference_answers(cfg, "train.jsonl", rows)


DAPO_ROW = {"prompt": [{"role": "user", "content": "2 + 3 ?"}], "data_source": "math_dapo",
            "reward_model": {"ground_truth": "34", "style": "rule-lighteval/MATH_v2"}}


def test_answer_key_reads_a_nested_field():
    """DAPO-Math-17k keeps the answer at reward_model.ground_truth."""
    cfg = data_config(question_key="prompt.0.content", answer_key="reward_model.ground_truth", answer_format="raw")
    check_columns("dapo.parquet", [DAPO_ROW], cfg.question_key, cfg.answer_key)
    assert reference_answers(cfg, "dapo.parquet", [DAPO_ROW]) == ["34"]
    # A column whose own name has the dots comes first.
    assert reference_answers(cfg, "t", [{**DAPO_ROW, "reward_model.ground_truth": "35"}]) == ["35"]


@pytest.mark.parametrize("key, message", [
    ("reward_model.answer", "row 1: no key 'answer' in 'reward_model' (keys: ground_truth, style)"),
    ("data_source.name", "row 1: 'data_source' is text; no 'name' in it for 'data_source.name'"),
    ("prompt.3.content", "row 1: 'prompt' is an array of length 1; no '3' in it for 'prompt.3.content'"),
    ("model.ground_truth", "no column 'model.ground_truth' (columns: prompt, data_source, reward_model)"),
])
def test_a_missing_nested_field_names_the_missing_part(key, message):
    with pytest.raises(DataFileError, match=re.escape(f"dapo.parquet: {message}")):
        check_columns("dapo.parquet", [DAPO_ROW], "prompt.0.content", key)


def test_a_later_row_without_the_nested_answer_is_named():
    rows = [DAPO_ROW, {**DAPO_ROW, "reward_model": None}]
    with pytest.raises(DataFileError, match=re.escape("t.jsonl: row 2: 'reward_model' is null; no 'ground_truth'")):
        reference_answers(data_config(answer_key="reward_model.ground_truth"), "t.jsonl", rows)


def test_a_split_may_name_its_own_columns():
    """Train on DAPO-Math's layout, evaluate on MATH-500's: each split reads its own keys."""
    cfg = DataConfig(train=DataSource(path="dapo.parquet"),
                     eval=DataSource(path="math500", question_key="problem", answer_key="answer"),
                     question_key="prompt.0.content", answer_key="reward_model.ground_truth", answer_format="raw")
    train, evals = cfg.for_split("train"), cfg.for_split("eval")
    assert (train.question_key, train.answer_key) == ("prompt.0.content", "reward_model.ground_truth")
    assert (evals.question_key, evals.answer_key, evals.answer_format) == ("problem", "answer", "raw")
    assert reference_answers(train, "dapo.parquet", [DAPO_ROW]) == ["34"]
    assert reference_answers(evals, "math500", [{"problem": "x?", "answer": " \\frac{1}{2} "}]) == ["\\frac{1}{2}"]
    with pytest.raises(DataFileError, match="no column 'problem' or 'answer'"):
        check_columns("dapo.parquet", [DAPO_ROW], evals.question_key, evals.answer_key)


def test_load_rows_from_a_local_jsonl(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n" for i in range(5)))
    assert load_rows(DataSource(path=str(path), limit=2)) == [
        {"question": "q0", "answer": "#### 0"}, {"question": "q1", "answer": "#### 1"}]
    assert len(load_rows(DataSource(path=str(path)))) == 5
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_rows(DataSource(path=str(tmp_path / "missing.jsonl")))


# ---------------------------------------------------------------- token-budget micro-batches


def padded(lengths, batch) -> int:
    return len(batch) * max(lengths[i] for i in batch)


def test_microbatches_by_hand():
    lengths = [5, 9, 3, 9, 2, 7]
    # Longest first: 9(1) 9(3) 7(5) 5(0) 3(2) 2(4). Budget 20: [1,3] pads to 2x9=18, adding 5 would
    # make 3x9=27; [5,0] is 2x7=14, adding 2 would make 3x7=21; [2,4] is 2x3=6.
    batches = token_budget_microbatches(lengths, 20)
    assert batches == [[1, 3], [5, 0], [2, 4]]
    assert [padded(lengths, b) for b in batches] == [18, 14, 6]
    assert padding_fraction(lengths, batches) == pytest.approx(3 / 38)  # 35 real tokens of 38


def test_a_budget_that_fits_everything_is_one_microbatch():
    assert token_budget_microbatches([3, 1, 2], 9) == [[0, 2, 1]]
    assert token_budget_microbatches([3, 1, 2], 8) == [[0, 2], [1]]


def test_a_row_over_the_budget_gets_its_own_microbatch():
    assert token_budget_microbatches([4, 30, 4], 16) == [[1], [0, 2]]


def test_no_rows_no_microbatches():
    assert token_budget_microbatches([], 16) == []


@pytest.mark.parametrize("seed", range(20))
def test_microbatches_cover_every_row_once_within_budget(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 80))]
    budget = rng.choice([64, 256, 1000, 4096])
    batches = token_budget_microbatches(lengths, budget)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert b, "no empty micro-batches"
        assert padded(lengths, b) <= budget or (len(b) == 1 and lengths[b[0]] > budget)
    # Greedy: a micro-batch is closed only when the next row would not fit in it.
    for b, nxt in zip(batches, batches[1:]):
        assert (len(b) + 1) * max(lengths[i] for i in b) > budget


def test_padding_fraction_by_hand():
    lengths = [4, 2, 3, 1]
    assert padding_fraction(lengths, [[0, 1], [2, 3]]) == pytest.approx(4 / 14)  # 10 real, 8 + 6 padded
    assert padding_fraction(lengths, [[0], [1], [2], [3]]) == 0.0
    assert padding_fraction(lengths, [[0, 1, 2, 3]]) == pytest.approx(1 - 10 / 16)
    assert padding_fraction([], []) == 0.0


# ---------------------------------------------------------------- splitting across ranks


def load(lengths, mbs) -> int:
    return sum(lengths[i] for mb in mbs for i in mb)


def test_split_by_hand_balances_tokens_and_pads_counts():
    lengths = [6, 4, 4, 3, 2, 1]
    batches = [[0, 1], [2, 3], [4, 5]]  # costs 10, 7, 3
    # Heaviest first to the lightest rank: 10 -> r0, 7 -> r1, 3 -> r1 (7 < 10). Loads 10 and 10;
    # round-robin would give 13 and 7. Rank 0 runs one empty micro-batch to match rank 1's two passes.
    assert split_across_ranks(batches, lengths, 2) == [[[0, 1], []], [[2, 3], [4, 5]]]


def test_split_by_hand_uneven_costs():
    lengths = [10, 4, 3, 2, 1]
    batches = [[0], [1], [2], [3], [4]]
    per_rank = split_across_ranks(batches, lengths, 2)
    assert per_rank == [[[0], [], [], []], [[1], [2], [3], [4]]]
    assert [load(lengths, r) for r in per_rank] == [10, 10]


def test_split_with_more_ranks_than_microbatches():
    per_rank = split_across_ranks([[0, 1]], [5, 5], 3)
    assert per_rank == [[[0, 1]], [[]], [[]]]


def test_split_on_one_rank_keeps_everything():
    batches = [[2], [0, 1], [3]]
    (only,) = split_across_ranks(batches, [4, 4, 9, 1], 1)
    assert sorted(only) == sorted(batches)


@pytest.mark.parametrize("seed", range(20))
def test_split_properties(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 200) for _ in range(rng.randint(1, 60))]
    batches = token_budget_microbatches(lengths, rng.choice([200, 500, 2000]))
    ranks = rng.randint(1, 5)
    per_rank = split_across_ranks(batches, lengths, ranks)
    assert len(per_rank) == ranks
    counts = {len(r) for r in per_rank}
    assert len(counts) == 1, "every rank runs the same number of passes"
    real = [mb for r in per_rank for mb in r if mb]
    assert sorted(real) == sorted(batches), "every micro-batch exactly once"
    assert counts.pop() == max(sum(1 for mb in r if mb) for r in per_rank), "no rank is padded needlessly"
    loads = [load(lengths, r) for r in per_rank]
    cost = [sum(lengths[i] for i in b) for b in batches]
    assert max(loads) - min(loads) <= max(cost), "greedy to the lightest rank stays within one micro-batch"


def test_engines_get_shares_balanced_by_expected_tokens():
    from rollout.worker import balance

    costs = [900, 100, 100, 100, 100, 100, 100, 100, 100, 100]
    shards = balance(costs, 2)
    # By count this would be 5 + 5 prompts (1300 vs 500 tokens); by tokens the long prompt is alone.
    assert shards == [[0], list(range(1, 10))]
    assert sorted(j for shard in shards for j in shard) == list(range(10))
    uneven = [37, 5, 12, 80, 44, 9, 61, 3]
    loads = [sum(uneven[j] for j in shard) for shard in balance(uneven, 3)]
    assert sorted(loads) == [82, 84, 85]  # 251 tokens over 3 engines: the best split is 83.7 each
    assert balance([5, 5], 4) == [[0], [1], [], []]
