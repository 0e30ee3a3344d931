"""The eval stage's measurements on the tiny policy: perplexity windows and values, sparsity, size
and bits, greedy generation by transformers, the table, and which verifier decides accuracy.
(The stage itself, with vLLM and Ray, runs in tests/test_e2e.py and tests/test_graph.py.)"""
import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import SYNTH_DATA, TINY_POLICY
from evaluation.config import EvalStage
from evaluation.footprint import linear_sparsity, weight_bytes
from evaluation.generation import architecture, generate_with_transformers, reloadable
from evaluation.perplexity import held_out_documents, perplexity, token_stream, token_windows
from evaluation.stage import measure_model
from evaluation.table import markdown_table, wandb_table
from launch.schema import ModelConfig, Recipe

TEXT = ["Ella has 34 pencils. Tom has 18 fewer pencils than Ella.", "Sam buys 3 cakes for 4 dollars each."]


@pytest.fixture(scope="module")
def tiny():
    return AutoModelForCausalLM.from_pretrained(TINY_POLICY, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_POLICY)


def recipe(stages, **data) -> Recipe:
    return Recipe.model_validate({
        "name": "t", "model": {"path": str(TINY_POLICY), "dtype": "float32"},
        "data": {"train": {"path": str(SYNTH_DATA / "train.jsonl")}, "eval": {"path": str(SYNTH_DATA / "eval.jsonl")},
                 "template": "Question: {question}\nAnswer:", "chat_template": False, **data},
        "stages": stages})


# --- perplexity -----------------------------------------------------------------------------

def test_windows_cut_the_stream_into_consecutive_non_overlapping_pieces():
    stream = list(range(100, 123))
    windows = token_windows(stream, 5)
    assert [len(w) for w in windows] == [5, 5, 5, 5, 3]
    assert [t for w in windows for t in w] == stream  # each token in exactly one window, in order
    assert token_windows(stream[:21], 5)[-1] == stream[15:20]  # a last one-token piece predicts nothing


def test_token_stream_ends_each_document_with_end_of_text(tokenizer):
    stream = token_stream(tokenizer, TEXT)
    first = tokenizer(TEXT[0], add_special_tokens=False)["input_ids"]
    assert stream[:len(first) + 1] == first + [tokenizer.eos_token_id]
    assert stream.count(tokenizer.eos_token_id) == 2 and stream[-1] == tokenizer.eos_token_id


def test_perplexity_is_exp_of_the_mean_nll_of_each_window_on_its_own(tiny, tokenizer):
    windows = token_windows(token_stream(tokenizer, TEXT), 9)
    nlls = []
    with torch.no_grad():  # token by token, each from its own window's prefix only
        for w in windows:
            for t in range(1, len(w)):
                logits = tiny(torch.tensor([w[:t]])).logits[0, -1].double()
                nlls.append(-torch.log_softmax(logits, -1)[w[t]].item())
    ppl, tokens = perplexity(tiny, windows)
    assert tokens == len(nlls) == sum(len(w) - 1 for w in windows)
    assert ppl == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
    whole, _ = perplexity(tiny, [[t for w in windows for t in w]])  # context across windows would change it
    assert whole != pytest.approx(ppl, rel=1e-3)


def test_a_model_predicting_uniformly_has_the_vocabulary_size_as_perplexity(tokenizer):
    model = AutoModelForCausalLM.from_pretrained(TINY_POLICY, dtype=torch.float32).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.zero_()  # tied to the head: every logit is 0
    ppl, _ = perplexity(model, token_windows(token_stream(tokenizer, TEXT), 16))
    assert ppl == pytest.approx(model.config.vocab_size, rel=1e-6)


def test_held_out_text_is_the_eval_prompt_followed_by_its_answer(tmp_path):
    r = recipe([{"name": "eval", "kind": "eval"}])
    tokenizer = AutoTokenizer.from_pretrained(TINY_POLICY)
    documents = held_out_documents(r, EvalStage(name="eval", limit=2), tokenizer)
    rows = [json.loads(line) for line in (SYNTH_DATA / "eval.jsonl").read_text().splitlines()[:2]]
    assert documents == [f"Question: {row['question']}\nAnswer: {row['answer']}" for row in rows]
    (tmp_path / "held.txt").write_text("one document\nof two lines")
    (tmp_path / "held.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert held_out_documents(r, EvalStage(name="e", perplexity_data=str(tmp_path / "held.txt")), tokenizer) == [
        "one document\nof two lines"]
    assert held_out_documents(r, EvalStage(name="e", perplexity_data=str(tmp_path / "held.jsonl")), tokenizer) == [
        "a", "b"]


# --- size, bits, sparsity -------------------------------------------------------------------

def test_sparsity_counts_exact_zeros_of_the_decoder_linears_only():
    model = AutoModelForCausalLM.from_pretrained(TINY_POLICY, dtype=torch.float32)
    layers = model.model.layers
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    total = sum(m.weight.numel() for m in linears)
    assert len(linears) == 14 and linear_sparsity(model) == 0  # q k v o gate up down, 2 layers
    with torch.no_grad():
        layers[0].self_attn.q_proj.weight[:, :10] = 0
        layers[1].mlp.down_proj.weight.zero_()
        layers[1].mlp.up_proj.weight[0, 0] = 1e-30  # tiny is not zero
        model.get_input_embeddings().weight[:50] = 0  # the embedding (and the tied head) do not count
    zeros = layers[0].self_attn.q_proj.weight.shape[0] * 10 + layers[1].mlp.down_proj.weight.numel()
    assert linear_sparsity(model) == zeros / total


def test_size_on_disk_counts_the_weight_files_only(tmp_path):
    assert weight_bytes(TINY_POLICY) == (TINY_POLICY / "model.safetensors").stat().st_size
    AutoModelForCausalLM.from_pretrained(TINY_POLICY, dtype=torch.bfloat16).save_pretrained(
        tmp_path / "bf16", max_shard_size="1MB")
    shards = list((tmp_path / "bf16").glob("*.safetensors"))
    assert len(shards) > 1 and weight_bytes(tmp_path / "bf16") == sum(p.stat().st_size for p in shards)
    assert weight_bytes(tmp_path / "bf16") < 0.51 * weight_bytes(TINY_POLICY)


def test_engine_reuse_needs_the_same_architecture_and_one_weights_file(tmp_path):
    config = json.loads((TINY_POLICY / "config.json").read_text())
    for name, edit in [("untied", {"tie_word_embeddings": False}),
                       ("bf16", {"tie_word_embeddings": False, "dtype": "bfloat16", "_name_or_path": "x"}),
                       ("quantized", {"tie_word_embeddings": False, "quantization_config": {"quant_method": "x"}}),
                       ("sharded", {"tie_word_embeddings": False})]:
        shutil.copytree(TINY_POLICY, tmp_path / name)
        (tmp_path / name / "config.json").write_text(json.dumps({**config, **edit}))
    shutil.copy(TINY_POLICY / "model.safetensors", tmp_path / "sharded" / "model-00002-of-00002.safetensors")
    untied = architecture(tmp_path / "untied")
    assert reloadable(tmp_path / "bf16", untied) == tmp_path / "bf16" / "model.safetensors"  # dtype aside
    assert reloadable(tmp_path / "quantized", untied) is None
    assert reloadable(tmp_path / "sharded", untied) is None
    assert reloadable(tmp_path / "untied", None) is None  # no engine yet
    assert reloadable(TINY_POLICY, architecture(TINY_POLICY)) == TINY_POLICY / "model.safetensors"  # tied too
    assert reloadable(TINY_POLICY, untied) is None


# --- generation and the per-model measurement -----------------------------------------------

def test_transformers_greedy_batches_match_one_prompt_at_a_time(tiny, tokenizer):
    prompts = [tokenizer(f"Question: {q}\nAnswer:")["input_ids"] for q in ("What is 2 + 3?", "How many?", "Tom has 7.")]
    generated = generate_with_transformers(tiny, tokenizer, prompts, max_new_tokens=12, batch_size=2)
    eos = tiny.generation_config.eos_token_id
    for prompt, completion in zip(prompts, generated.completions):
        ids = list(prompt)
        with torch.no_grad():
            while len(ids) - len(prompt) < 12:
                ids.append(int(tiny(torch.tensor([ids])).logits[0, -1].argmax()))
                if ids[-1] == eos:
                    break
        assert completion["token_ids"] == ids[len(prompt):]
        assert completion["text"] == tokenizer.decode([t for t in ids[len(prompt):] if t != eos])
    assert generated.engine == "transformers" and generated.tokens_per_s > 0


def test_measure_model_reports_every_metric_of_the_tiny_policy(tiny, tokenizer):
    cfg = EvalStage(name="eval", perplexity_window=4096, max_new_tokens=4)
    stream = token_stream(tokenizer, TEXT)
    prompt = tokenizer("Question: 1 + 1?\nAnswer:")["input_ids"]
    measured = measure_model(str(TINY_POLICY), cfg, ModelConfig(path=str(TINY_POLICY), dtype="float32"), stream,
                             prompts=[prompt])
    assert measured["perplexity_window"] == 512  # capped at max_position_embeddings
    assert measured["perplexity_tokens"] == len(stream) - 1  # one window
    assert measured["perplexity"] == pytest.approx(perplexity(tiny, [stream])[0], rel=1e-6)
    assert measured["sparsity"] == 0 and measured["bits_per_weight"] == 32
    assert measured["size_bytes"] == weight_bytes(TINY_POLICY)
    assert measured["generated"].completions == generate_with_transformers(tiny, tokenizer, [prompt], 4, 1).completions


# --- the table and the verifier -------------------------------------------------------------

RESULTS = {
    "base": {"accuracy": 0.125, "perplexity": 12.3456, "size_bytes": 2_231_976, "bits_per_weight": 32.0,
             "sparsity": 0.0, "tokens_per_s": 812.34, "engine": "vllm"},
    "w4": {"accuracy": 0.0625, "perplexity": 14.0, "size_bytes": 700_000, "bits_per_weight": None,
           "sparsity": 0.5, "tokens_per_s": 35.0, "engine": "transformers"},
}


def test_markdown_table_has_one_row_per_artifact():
    assert markdown_table(RESULTS) == (
        "| artifact | accuracy | perplexity | size MB | bits/weight | sparsity | tokens/s | engine |\n"
        "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | :--- |\n"
        "| base | 0.125 | 12.346 | 2.23 | 32.00 | 0.000 | 812.3 | vllm |\n"
        "| w4 | 0.062 | 14.000 | 0.70 | n/a | 0.500 | 35.0 | transformers |\n")


def test_wandb_table_holds_the_same_rows_unformatted():
    table = wandb_table(RESULTS)
    assert table.columns[:3] == ["artifact", "accuracy", "perplexity"]
    assert table.data == [["base", 0.125, 12.3456, 2.231976, 32.0, 0.0, 812.34, "vllm"],
                          ["w4", 0.0625, 14.0, 0.7, None, 0.5, 35.0, "transformers"]]


@pytest.mark.parametrize("stages, expected", [
    ([{"name": "e", "kind": "eval", "accuracy": "boxed_accuracy"}], "boxed_accuracy"),
    ([{"name": "e", "kind": "eval"}], "gsm8k_accuracy"),
    ([{"name": "a", "kind": "rl", "rewards": {"terms": [{"verifier": "boxed_format"}, {"verifier": "boxed_accuracy"}]}},
      {"name": "b", "kind": "rl"}, {"name": "e", "kind": "eval"}], "boxed_accuracy"),
    ([{"name": "a", "kind": "rl", "rewards": {"terms": [{"verifier": "format"}]}}, {"name": "e", "kind": "eval"}],
     "gsm8k_accuracy"),  # the rl stage has no accuracy verifier
], ids=["explicit", "no-rl-stage", "first-rl-stage", "rl-without-accuracy"])
def test_eval_stage_judges_like_the_rl_stage(stages, expected):
    assert recipe(stages).stages[-1].accuracy == expected  # resolved with the recipe
