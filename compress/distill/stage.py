"""The distill stage: the student (this stage's input model, masks kept) learns the teacher's
next-token distributions on the train prompts; see compress/distill/worker.py for one rank. With
`learned_nm` the student, dense on entry, learns N:M masks as it distils (LBC) and the stage
writes them to `masks.safetensors`, for the stages after it to keep.

The loop, on the driver, reads like single-process code: draw prompts (uniformly, or from KCD's
condensed set), hand each rank its share, step, feed the per-prompt values back to KCD. No
mid-stage checkpoints: a restarted stage distils again from its input.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from compress.distill.kcd import KnowledgeCondenser
from compress.distill.worker import DistillPrompt, DistillWorker
from launch.preflight import lookup
from rl.data import PromptSampler, load_problems, load_rows
from rl.fileio import write_json_atomic
from rl.learner_group import RankGroup


def distill(ranks, prompts: list[list[int]], references: list[list[int]] | None, heldout: list[list[int]], cfg,
            seed: int, log=print) -> dict:
    """Run `cfg.steps` steps on `ranks` (anything with `world_size` and `call(method, *args,
    per_rank_args=...)` returning one result per rank) and return the stage's numbers.
    `references[i]`: the completion of `prompts[i]` when `cfg.sequences` is `reference`."""
    world = ranks.world_size
    draws = KnowledgeCondenser(len(prompts), cfg.kcd, seed) if cfg.kcd else PromptSampler(len(prompts), seed)
    on_policy = np.random.default_rng([seed, 1])
    ranks.call("set_heldout", per_rank_args=[(heldout[r::world],) for r in range(world)])
    kl_before = heldout_kl(ranks)
    log(f"[{cfg.name}] held-out KL(teacher‖student) before: {kl_before:.4f}")
    losses = []
    for step in range(1, cfg.steps + 1):
        picked = draws.next(cfg.prompts_per_step)
        sampled = on_policy.random(len(picked)) < cfg.on_policy_fraction
        work = [DistillPrompt(i, prompts[i], references[i] if references is not None else None, bool(s))
                for i, s in zip(picked, sampled)]
        results = ranks.call("train_step", per_rank_args=[(step, work[r::world]) for r in range(world)])
        losses.append(sum(r.loss_sum for r in results) / max(1, sum(r.tokens for r in results)))
        kept = ""
        if cfg.kcd:
            draws.observe([v for r in results for v in r.values])
            draws.end_step(step)
            kept = f", drawing from {len(draws.kept)}/{len(prompts)} prompts"
        log(f"[{cfg.name}] step {step}/{cfg.steps}: loss {losses[-1]:.4f}, lr {results[0].lr:.3g}, "
            f"grad norm {results[0].grad_norm:.3f}{kept}")
    kl_after = heldout_kl(ranks)
    log(f"[{cfg.name}] held-out KL(teacher‖student) after: {kl_after:.4f}")
    return {"loss": cfg.loss, "steps": cfg.steps, "first_loss": losses[0], "last_loss": losses[-1], "losses": losses,
            "heldout_kl_before": kl_before, "heldout_kl_after": kl_after,
            "kept_prompts": len(draws.kept) if cfg.kcd else len(prompts)}


def heldout_kl(ranks) -> float:
    """Token mean over all ranks' held-out sequences of KL(p_T‖p_S)."""
    parts = ranks.call("heldout_kl")
    return sum(total for total, _ in parts) / max(1, sum(tokens for _, tokens in parts))


def reference_completions(recipe, tokenizer_path: str) -> list[list[int]]:
    """The train split's reference text (`data.answer_key`, as written) + EOS, per row."""
    from transformers import AutoTokenizer

    data = recipe.data.for_split("train")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=recipe.model.trust_remote_code)
    texts = [str(lookup(row, data.answer_key)) for row in load_rows(data.train)]
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def teacher_path(teacher: str | None, inputs: dict[str, dict], stage_names: list[str], default: str) -> str:
    """The teacher model folder: an input stage's model, a path / hub name, or `default`."""
    if teacher is None:
        return default
    if teacher in inputs:
        if not inputs[teacher].get("model"):
            raise ValueError(f"teacher: stage '{teacher}' has no output model")
        return inputs[teacher]["model"]
    if teacher in stage_names:
        raise ValueError(f"teacher: stage '{teacher}' is not among this stage's `needs`")
    return teacher


def input_masks(cfg, masks_path) -> str | None:
    """The masks file the student keeps, refused when the stage learns its own (one mask source)."""
    if masks_path is not None and cfg.learned_nm is not None:
        raise ValueError(f"stage '{cfg.name}' learns N:M masks (learned_nm) but its input already has masks "
                         f"({masks_path}); drop one of the two")
    return str(masks_path) if masks_path is not None else None


def distill_ranks(ctx, student_cfg, teacher_cfg, masks_path: str | None) -> RankGroup:
    """The stage's ranks as Ray actors on its reserved resources (rl/learner_group.py)."""
    cfg, world = ctx.stage, ctx.stage.ranks
    return RankGroup(DistillWorker, "distill", world, cfg.num_gpus_per_rank > 0, ctx.recipe.cluster.liveness,
                     lambda r: ctx.placement.options("learner", r),
                     lambda r, address, port: (r, world, address, port, student_cfg, teacher_cfg, cfg, masks_path,
                                               ctx.recipe.seed))


def run_distill_stage(ctx) -> dict:
    recipe, cfg = ctx.recipe, ctx.stage
    start = time.monotonic()
    student = recipe.model.model_copy(update={"path": ctx.input_model(exclude=(cfg.teacher,) if cfg.teacher else ())})
    teacher = recipe.model.model_copy(update={"path": teacher_path(
        cfg.teacher, ctx.inputs, [s.name for s in recipe.stages], recipe.model.path)})
    masks = input_masks(cfg, ctx.input_masks())
    prompts, _ = load_problems(recipe, "train")
    references = reference_completions(recipe, student.path) if cfg.sequences == "reference" else None
    heldout, _ = load_problems(recipe, "eval", cfg.heldout_prompts)
    print(f"[{cfg.name}] distilling {teacher.path} into {student.path} ({cfg.loss}, {len(prompts)} train prompts, "
          f"masks: {masks or 'none'})", flush=True)
    out_dir = Path(ctx.stage_dir) / "model"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    ranks = distill_ranks(ctx, student, teacher, masks)
    learned = None
    try:
        summary = distill(ranks, prompts, references, heldout, cfg, recipe.seed,
                          log=lambda line: print(line, flush=True))
        if cfg.learned_nm is not None:
            masks = str(Path(ctx.stage_dir) / "masks.safetensors")
            learned = ranks.call("finish_learned_masks", masks)[0]
            print(f"[{cfg.name}] learned {cfg.learned_nm.n}:{cfg.learned_nm.m} masks: sparsity "
                  f"{learned['sparsity']:.4f}, valid {learned['n_m_valid']}", flush=True)
        ranks.call("save_hf", str(out_dir), student.path)
    finally:
        ranks.shutdown()
    stage_json = Path(ctx.stage_dir) / "stage.json"
    write_json_atomic(stage_json, {"method": "distill", "parameters": cfg.model_dump(mode="json"),
                                   "teacher": teacher.path, "student": student.path, "masks": masks,
                                   "learned_nm": learned, **summary,
                                   "wall_time_s": time.monotonic() - start})
    return {"model": str(out_dir), "masks": masks, "stage_json": str(stage_json)}
