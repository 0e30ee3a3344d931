"""vLLM engines as Ray actors: generate G samples per prompt with per-token logprobs.

Each engine actor answers a health probe while it generates (two actor threads): vLLM's engine
core runs in a child process, and when that process dies in the middle of a generate call the
call never returns. The group notices through the probe, replaces the engine, reloads the latest
weights into it and regenerates that engine's prompts, without touching the learners.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import ray

from rl.liveness import WorkerFailure, gather


@dataclass(frozen=True)
class EngineSpec:
    model_path: str
    dtype: str
    max_model_len: int
    seed: int
    num_cpus: float = 1
    num_gpus: float = 0
    cpu_kvcache_gib: int = 1
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.5
    trust_remote_code: bool = False


class RolloutWorker:
    def __init__(self, spec: EngineSpec):
        import psutil
        from vllm import LLM

        self.llm = LLM(model=spec.model_path, dtype=spec.dtype, max_model_len=spec.max_model_len, seed=spec.seed,
                       enforce_eager=spec.enforce_eager, gpu_memory_utilization=spec.gpu_memory_utilization,
                       trust_remote_code=spec.trust_remote_code, enable_prefix_caching=False,
                       # Weight sync calls these methods by name: nothing is pickled.
                       worker_extension_cls="rollout.weight_sync.WeightLoader",
                       # Logprobs of the distribution actually sampled (after temperature), the
                       # same quantity the learner computes from logits / temperature.
                       logprobs_mode="processed_logprobs")
        # vLLM's engine core and its workers: processes whose death we must notice ourselves.
        self._engine_processes = [(p, p.name()) for p in psutil.Process().children(recursive=True)
                                  if p.name().startswith("VLLM")]

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

    def dead_processes(self) -> list[str]:
        """Engine processes that are gone (runs beside a generate call: it must not touch the engine)."""
        import psutil

        dead = []
        for proc, name in self._engine_processes:
            try:
                alive = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            if not alive:
                dead.append(f"{name} (pid {proc.pid})")
        return dead

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
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        "TOKENIZERS_PARALLELISM": "false",
    }


class RolloutGroup:
    """N engines; prompts are split across them and results come back in prompt order.

    `liveness` is the recipe's `cluster.liveness`; an engine that dies is replaced up to
    `max_replacements` times over the group's life.
    """

    def __init__(self, spec: EngineSpec, engines: int, liveness, max_replacements: int = 0):
        self.spec, self.liveness, self.replacements_left = spec, liveness, max_replacements
        self.latest_weights: tuple[str, str, float] | None = None  # (transport, handle, timeout)
        self.restarts = [0] * engines  # per engine: how many times it was replaced (varies its seed)
        self.workers = [self._start(i) for i in range(engines)]
        try:
            gather([w.ready.remote() for w in self.workers], self.names, "starting rollout engines",
                   liveness.startup_timeout_s)
        except BaseException:  # the caller gets no group to shut down: stop the engines here
            self.shutdown()
            raise

    @property
    def names(self) -> list[str]:
        return [f"rollout engine {i}" for i in range(len(self.workers))]

    def _start(self, index: int):
        spec = replace(self.spec, seed=self.spec.seed + index + 1000 * self.restarts[index])
        actor = ray.remote(RolloutWorker).options(
            num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, max_concurrency=2,
            runtime_env={"env_vars": engine_env(spec.cpu_kvcache_gib)})
        return actor.remote(spec)

    def dead_engines(self) -> dict[str, str]:
        """{engine name: problem} for engines whose actor answers but whose vLLM processes died."""
        refs = [w.dead_processes.remote() for w in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.liveness.probe_interval_s)
        problems = {}
        for name, ref in zip(self.names, refs):
            if ref in ready:
                try:
                    dead = ray.get(ref)
                except ray.exceptions.RayError:
                    continue  # the actor itself is gone: the wait on its call reports that
                if dead:
                    problems[name] = f"{name}: vLLM process died: {', '.join(dead)}"
        return problems

    def generate(self, prompts: list[list[int]], n: int, temperature: float, top_p: float,
                 max_new_tokens: int) -> list[list[dict]]:
        k = len(self.workers)
        shards = {i: list(range(len(prompts)))[i::k] for i in range(k) if prompts[i::k]}

        def submit(i):
            return self.workers[i].generate.remote([prompts[j] for j in shards[i]], n, temperature, top_p,
                                                   max_new_tokens)

        refs = {i: submit(i) for i in shards}
        while True:
            try:
                outs = gather(list(refs.values()), [self.names[i] for i in refs], "generate",
                              self.liveness.call_timeout_s, probe=self.dead_engines,
                              probe_interval_s=self.liveness.probe_interval_s)
                break
            except WorkerFailure as failure:
                for i in self._replace_failed(failure):
                    if i in refs:
                        refs[i] = submit(i)
        results: list = [None] * len(prompts)
        for i, out in zip(refs, outs):
            for j, completions in zip(shards[i], out):
                results[j] = completions
        return results

    def _replace_failed(self, failure: WorkerFailure) -> list[int]:
        """Replace the engines a failure names (each gets the latest weights), or re-raise it."""
        failed = [i for i, name in enumerate(self.names) if name in failure.workers]
        if not failed or self.replacements_left < len(failed):
            raise failure
        for i in failed:
            self.replacements_left -= 1
            self.restarts[i] += 1
            print(f"[rollout] {failure}; replacing {self.names[i]}", flush=True)
            ray.kill(self.workers[i])
            self.workers[i] = self._start(i)
        gather([self.workers[i].ready.remote() for i in failed], [self.names[i] for i in failed],
               "restarting rollout engines", self.liveness.startup_timeout_s)
        if self.latest_weights is not None:
            self._load(self.latest_weights, failed)
        return failed

    def load_weights(self, transport: str, handle: str, timeout_s: float) -> None:
        self.latest_weights = (transport, handle, timeout_s)
        self._load(self.latest_weights, range(len(self.workers)))

    def _load(self, weights: tuple[str, str, float], indices) -> None:
        transport, handle, timeout_s = weights
        indices = list(indices)
        try:
            gather([self.workers[i].load_weights.remote(transport, handle, timeout_s) for i in indices],
                   [self.names[i] for i in indices], "weight sync", timeout_s, probe=self.dead_engines,
                   probe_interval_s=self.liveness.probe_interval_s)
        except WorkerFailure as failure:
            self._replace_failed(failure)  # a replacement loads the latest weights itself

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
