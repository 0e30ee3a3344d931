"""The eval stage: greedy accuracy of each model artifact on the eval split, by the stage's verifier."""
from __future__ import annotations

import json

from rewards import RewardPool, max_chars_for
from rl.data import load_problems
from rl.fileio import write_json_atomic, write_text_atomic
from rollout.worker import EngineSpec, RolloutGroup, Sampling


def evaluate_model(model_path: str, recipe, cfg, prompts: list[list[int]], references: list[str]) -> tuple[dict, list[dict]]:
    """Summary results, and one record per problem: {text, tokens, correct}."""
    spec = EngineSpec(model_path, recipe.model.dtype, recipe.data.max_prompt_tokens + cfg.max_new_tokens, recipe.seed,
                      cfg.num_cpus, cfg.num_gpus, cfg.cpu_kvcache_gib, trust_remote_code=recipe.model.trust_remote_code)
    engine = RolloutGroup(spec, 1, recipe.cluster.liveness, max_replacements=recipe.cluster.max_restarts).wait_ready()
    try:
        outputs = engine.generate(prompts, Sampling(n=1, temperature=0.0, top_p=1.0, max_new_tokens=cfg.max_new_tokens),
                                  mode="eval")
    finally:
        engine.shutdown()
    texts = [out[0]["text"] for out in outputs]
    with RewardPool([{"verifier": cfg.accuracy, "weight": 1.0}], max_chars=max_chars_for(cfg.max_new_tokens),
                    accuracy=cfg.accuracy) as pool:
        scored = pool.score(texts, references)
    lengths = [len(out[0]["token_ids"]) for out in outputs]
    summary = {"accuracy": sum(scored.correct) / len(texts), "n": len(texts),
               "length_mean": sum(lengths) / len(lengths), "samples": texts[:3]}
    return summary, [{"text": t, "tokens": n, "correct": ok} for t, n, ok in zip(texts, lengths, scored.correct)]


def run_eval_stage(ctx) -> dict:
    recipe, cfg = ctx.recipe, ctx.stage
    models = {"base": recipe.model.path} if cfg.include_base else {}
    models.update({name: art["model"] for name, art in ctx.inputs.items() if "model" in art})
    if not models:
        raise ValueError(f"eval stage '{cfg.name}' has no model to evaluate (include_base is off and no input has one)")
    prompts, references = load_problems(recipe, "eval", cfg.limit)
    results = {}
    for name, path in models.items():
        results[name], completions = evaluate_model(path, recipe, cfg, prompts, references)
        write_text_atomic(ctx.stage_dir / f"completions-{name}.jsonl", "".join(json.dumps(c) + "\n" for c in completions))
        print(f"[{cfg.name}] {name}: greedy accuracy {results[name]['accuracy']:.3f} "
              f"on {results[name]['n']} problems ({path})", flush=True)
    write_json_atomic(ctx.stage_dir / "results.json", results)
    return {"results": str(ctx.stage_dir / "results.json"),
            "accuracy": {name: r["accuracy"] for name, r in results.items()}}
