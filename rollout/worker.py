"""A vLLM engine as a Ray actor: generate G samples per prompt with per-token logprobs."""
from __future__ import annotations

import os

import ray


class RolloutWorker:
    def __init__(self, model_path: str, dtype: str, max_model_len: int, seed: int,
                 enforce_eager: bool = True, gpu_memory_utilization: float = 0.5):
        from vllm import LLM

        self.llm = LLM(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                       enforce_eager=enforce_eager, gpu_memory_utilization=gpu_memory_utilization,
                       enable_prefix_caching=False,
                       # Logprobs of the distribution actually sampled (after temperature), the
                       # same quantity the learner computes from logits / temperature.
                       logprobs_mode="processed_logprobs")

    def generate(self, prompts: list[list[int]], n: int, temperature: float, top_p: float,
                 max_new_tokens: int) -> list[list[dict]]:
        """For each prompt, n completions as {token_ids, logprobs, finish_reason, text}.

        Sampling draws from the engine's seeded generator. Per-request seeds are not used: vLLM
        0.32's CPU runner fails on them once prefills are chunked ("CPU Generator does not use
        offset").
        """
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                logprobs=0 if temperature > 0 else None)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                    use_tqdm=False)
        return [[_completion(c) for c in out.outputs] for out in outputs]

    def load_weights(self, transport: str, handle: str, timeout_s: float) -> None:
        from rollout.weight_sync import TRANSPORTS

        TRANSPORTS[transport].receive(self.llm, handle, timeout_s)

    def ready(self) -> bool:
        return True


def _completion(c) -> dict:
    logprobs = None
    if c.logprobs is not None:
        logprobs = [step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs)]
    return {"token_ids": list(c.token_ids), "logprobs": logprobs,
            "finish_reason": c.finish_reason, "text": c.text}


def engine_env(cpu_kvcache_gib: int) -> dict[str, str]:
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(cpu_kvcache_gib),
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # collective_rpc ships the sync function by value
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        "TOKENIZERS_PARALLELISM": "false",
    }


class RolloutGroup:
    """N engines; prompts are split across them and results come back in prompt order."""

    def __init__(self, model_path: str, dtype: str, max_model_len: int, seed: int, engines: int,
                 num_cpus: float, num_gpus: float, cpu_kvcache_gib: int, enforce_eager: bool = True,
                 gpu_memory_utilization: float = 0.5):
        actor = ray.remote(RolloutWorker).options(
            num_cpus=num_cpus, num_gpus=num_gpus,
            runtime_env={"env_vars": engine_env(cpu_kvcache_gib)})
        self.workers = [actor.remote(model_path, dtype, max_model_len, seed + i, enforce_eager,
                                     gpu_memory_utilization) for i in range(engines)]
        ray.get([w.ready.remote() for w in self.workers])

    def generate(self, prompts: list[list[int]], n: int, temperature: float, top_p: float,
                 max_new_tokens: int) -> list[list[dict]]:
        shards = [list(range(len(prompts)))[i::len(self.workers)] for i in range(len(self.workers))]
        refs = [w.generate.remote([prompts[j] for j in shard], n, temperature, top_p, max_new_tokens)
                for w, shard in zip(self.workers, shards) if shard]
        results: list = [None] * len(prompts)
        for shard, out in zip([s for s in shards if s], ray.get(refs)):
            for j, completions in zip(shard, out):
                results[j] = completions
        return results

    def load_weights(self, transport: str, handle: str, timeout_s: float) -> None:
        refs = [w.load_weights.remote(transport, handle, timeout_s) for w in self.workers]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if pending:
            raise TimeoutError(f"weight sync to {len(pending)} rollout engine(s) did not finish in {timeout_s}s")
        ray.get(ready)

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
