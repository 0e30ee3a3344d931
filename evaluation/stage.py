"""The eval stage: every model artifact of the run measured side by side.

Artifacts: the recipe's starting model (`include_base`) and the model of every stage in `needs`.
Per artifact: greedy accuracy on the eval split with the recipe's accuracy verifier, generation
throughput of that run (completion tokens/s), held-out perplexity, size on disk, bits per weight
and the sparsity of the Linear weights. Two phases, both on the stage's reserved resources:
1. vLLM generates for every artifact it serves, reusing one engine across artifacts of the same
   architecture (evaluation/generation.py);
2. then, one Ray task per artifact (`ctx.remote`, after the engine is gone: they share the
   reservation) loads it in transformers for perplexity and sparsity, and generates for the
   artifacts vLLM could not serve. The row records which engine generated.
Outputs in the stage dir: `results.json`, `completions-<artifact>.jsonl`, `table.md`; the table,
and a sample of each artifact's completions, also go to W&B when it is on (evaluation/table.py).
"""
from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compress.bits import bits_per_weight
from evaluation.footprint import linear_sparsity, weight_bytes
from evaluation.generation import Generated, generate_with_transformers, generate_with_vllm
from evaluation.perplexity import held_out_documents, perplexity, token_stream, token_windows
from evaluation.table import COMPLETION_SAMPLES, completion_rows, log_wandb_table, markdown_table
from rewards import RewardPool, max_chars_for
from rl.data import load_problems
from rl.fileio import write_json_atomic, write_text_atomic
from rollout.worker import EngineSpec, RolloutGroup, Sampling


def artifact_models(ctx) -> dict[str, str]:
    """{artifact name: model folder}: "base" (the recipe's model) first, then each input stage's model."""
    cfg = ctx.stage
    if cfg.include_base and "base" in ctx.inputs:
        raise ValueError(f"eval stage '{cfg.name}': an input stage is named 'base', as is the recipe's model; rename "
                         "the stage or set include_base: false")
    models = {"base": ctx.recipe.model.path} if cfg.include_base else {}
    models.update({name: art["model"] for name, art in ctx.inputs.items() if art.get("model")})
    if not models:
        raise ValueError(f"eval stage '{cfg.name}' has no model to evaluate (include_base is off and no input has one)")
    return models


def measure_model(model_path: str, cfg, model_cfg, held_out: list[int],
                  prompts: list[list[int]] | None = None) -> dict:
    """Perplexity on the `held_out` token stream, size, bits per weight and sparsity of one model,
    and (given `prompts`) its greedy completions by transformers under the key "generated".
    Text is decoded with the recipe's tokenizer (`model_cfg.path`), which encoded the prompts."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=model_cfg.dtype,
                                                 trust_remote_code=model_cfg.trust_remote_code)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    measured = {}
    if prompts is not None:
        tokenizer = AutoTokenizer.from_pretrained(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code)
        measured["generated"] = generate_with_transformers(model, tokenizer, prompts, cfg.max_new_tokens,
                                                           cfg.fallback_batch_size)
    window = min(cfg.perplexity_window, getattr(model.config, "max_position_embeddings", cfg.perplexity_window))
    ppl, tokens = perplexity(model, token_windows(held_out, window))
    return {**measured, "perplexity": ppl, "perplexity_tokens": tokens, "perplexity_window": window,
            "size_bytes": weight_bytes(model_path), "bits_per_weight": bits_per_weight(model_path),
            "sparsity": linear_sparsity(model)}


def run_eval_stage(ctx) -> dict:
    recipe, cfg = ctx.recipe, ctx.stage
    models = artifact_models(ctx)
    verifier = cfg.accuracy  # resolved with the recipe: the rl stage's accuracy verifier by default
    prompts, references = load_problems(recipe, "eval", cfg.limit)
    # One tokenizer for every artifact (compressed models keep the vocabulary): the same prompts
    # and the same held-out tokens, so perplexities compare.
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.path, trust_remote_code=recipe.model.trust_remote_code)
    held_out = token_stream(tokenizer, held_out_documents(recipe, cfg, tokenizer))
    sampled_prompts = [tokenizer.decode(p) for p in prompts[:COMPLETION_SAMPLES]]  # for W&B's completions table

    def log(line: str) -> None:
        print(f"[{cfg.name}] {line}", flush=True)

    def start_engine(path: str) -> RolloutGroup:
        spec = EngineSpec(path, recipe.model.dtype, recipe.data.max_prompt_tokens + cfg.max_new_tokens, recipe.seed,
                          cfg.num_cpus, cfg.num_gpus, cfg.cpu_kvcache_gib,
                          trust_remote_code=recipe.model.trust_remote_code)
        return RolloutGroup(spec, 1, recipe.cluster.liveness, max_replacements=recipe.cluster.max_restarts,
                            placed=lambda index: ctx.placement.options("main", 0)).wait_ready()

    greedy = Sampling(n=1, temperature=0.0, top_p=1.0, max_new_tokens=cfg.max_new_tokens)
    by_vllm = generate_with_vllm(models, prompts, greedy, start_engine, recipe.cluster.liveness.call_timeout_s, log)
    results, sampled = {}, []
    with RewardPool([{"verifier": verifier, "weight": 1.0}], max_chars=max_chars_for(cfg.max_new_tokens),
                    accuracy=verifier) as pool:
        for name, path in models.items():
            served = isinstance(by_vllm[name], Generated)
            measured = ctx.remote(measure_model, path, cfg, recipe.model, held_out, None if served else prompts)
            generated = by_vllm[name] if served else measured.pop("generated")
            texts = [c["text"] for c in generated.completions]
            lengths = [len(c["token_ids"]) for c in generated.completions]
            correct = pool.score(texts, references).correct
            results[name] = {"path": path, "engine": generated.engine, "engine_note": None if served else by_vllm[name],
                             "accuracy": sum(correct) / len(texts), "n": len(texts),
                             "length_mean": sum(lengths) / len(lengths), "tokens_per_s": generated.tokens_per_s,
                             **measured, "samples": texts[:3]}
            write_text_atomic(ctx.stage_dir / f"completions-{name}.jsonl",
                              "".join(json.dumps({"text": t, "tokens": n, "correct": ok}) + "\n"
                                      for t, n, ok in zip(texts, lengths, correct)))
            sampled += completion_rows(name, sampled_prompts, texts, references, correct, lengths)
            r = results[name]
            bits = "n/a" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.2f}"
            log(f"{name}: {verifier} {r['accuracy']:.3f} on {r['n']} problems ({r['engine']}, "
                f"{r['tokens_per_s']:.1f} tokens/s), perplexity {r['perplexity']:.3f}, {r['size_bytes'] / 1e6:.2f} MB, "
                f"{bits} bits/weight, sparsity {r['sparsity']:.3f} ({path})")
    write_json_atomic(ctx.stage_dir / "results.json", results)
    write_text_atomic(ctx.stage_dir / "table.md", markdown_table(results))
    log_wandb_table(recipe, ctx.run_dir, cfg.name, results, sampled)
    return {"results": str(ctx.stage_dir / "results.json"), "table": str(ctx.stage_dir / "table.md"),
            "accuracy": {name: r["accuracy"] for name, r in results.items()}}
