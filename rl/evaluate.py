"""The eval stage: greedy accuracy of each model artifact on the eval split."""
from __future__ import annotations

from rewards import RewardPool, max_chars_for
from rl.data import load_problems
from rl.fileio import write_json_atomic
from rollout.worker import EngineSpec, RolloutGroup


def evaluate_model(model_path: str, recipe, cfg, prompts: list[list[int]], references: list[str]) -> dict:
    spec = EngineSpec(model_path, recipe.model.dtype, recipe.data.max_prompt_tokens + cfg.max_new_tokens, recipe.seed,
                      cfg.num_cpus, cfg.num_gpus, cfg.cpu_kvcache_gib, trust_remote_code=recipe.model.trust_remote_code)
    engine = RolloutGroup(spec, 1, recipe.cluster.liveness, max_replacements=recipe.cluster.max_restarts).wait_ready()
    try:
        outputs = engine.generate(prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=cfg.max_new_tokens)
    finally:
        engine.shutdown()
    texts = [out[0]["text"] for out in outputs]
    with RewardPool([{"verifier": "gsm8k_accuracy", "weight": 1.0}], max_chars=max_chars_for(cfg.max_new_tokens)) as pool:
        scored = pool.score(texts, references)
    lengths = [len(out[0]["token_ids"]) for out in outputs]
    return {"accuracy": sum(scored.correct) / len(texts), "n": len(texts),
            "length_mean": sum(lengths) / len(lengths), "samples": texts[:3]}


def run_eval_stage(ctx) -> dict:
    recipe, cfg = ctx.recipe, ctx.stage
    models = {"base": recipe.model.path} if cfg.include_base else {}
    models.update({name: art["model"] for name, art in ctx.inputs.items() if "model" in art})
    if not models:
        raise ValueError(f"eval stage '{cfg.name}' has no model to evaluate (include_base is off and no input has one)")
    prompts, references = load_problems(recipe, "eval", cfg.limit)
    results = {}
    for name, path in models.items():
        results[name] = evaluate_model(path, recipe, cfg, prompts, references)
        print(f"[{cfg.name}] {name}: greedy accuracy {results[name]['accuracy']:.3f} "
              f"on {results[name]['n']} problems ({path})", flush=True)
    write_json_atomic(ctx.stage_dir / "results.json", results)
    return {"results": str(ctx.stage_dir / "results.json"),
            "accuracy": {name: r["accuracy"] for name, r in results.items()}}
