"""vLLM engines as Ray actors: generate G samples per prompt with per-token logprobs.

Each engine actor answers a health probe while it generates (two actor threads): on GPU vLLM's
engine core runs in a child process, and when that process dies in the middle of a generate call
the call never returns. The group notices through the probe (or, for CPU engines, which run vLLM
inside the actor, through the actor's death), replaces the engine, reloads the latest weights into
it and regenerates that engine's prompts, without touching the learners.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Callable

import ray

from rl.liveness import WorkerFailure, gather
from rollout.truncation import Truncation, sampled_logprobs, truncated_rollout

MODES = ("train", "eval")  # eval decodes plainly: no truncated rollouts


@dataclass(frozen=True)
class Sampling:
    """How completions are sampled: one object for plain sampling and truncated rollouts."""
    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    truncation: Truncation | None = None  # Step-GRPO's dynamic truncated rollout, train mode only


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
    # vLLM's engine core and worker inside the actor's process: CPU engines start in ~5 s instead
    # of ~35 s (two fewer interpreters importing torch and vLLM). GPU engines keep vLLM's own
    # processes, which overlap scheduling with the forward pass.
    in_process: bool | None = None  # None: in process exactly when the engine has no GPU
    # For rollouts of several calls per sample (truncated rollouts): each call's prompt is the
    # previous call's prompt and output. Reset after every weight load.
    prefix_caching: bool = False

    @property
    def runs_in_process(self) -> bool:
        return self.in_process if self.in_process is not None else not self.num_gpus


class RolloutWorker:
    def __init__(self, spec: EngineSpec):
        import psutil
        from vllm import LLM

        self.llm = LLM(model=spec.model_path, dtype=spec.dtype, max_model_len=spec.max_model_len, seed=spec.seed,
                       enforce_eager=spec.enforce_eager, gpu_memory_utilization=spec.gpu_memory_utilization,
                       trust_remote_code=spec.trust_remote_code, enable_prefix_caching=spec.prefix_caching,
                       **_deterministic_scheduling(spec),
                       **({"distributed_executor_backend": "uni"} if spec.runs_in_process else {}),
                       # Weight sync calls these methods by name: nothing is pickled.
                       worker_extension_cls="rollout.weight_sync.WeightLoader",
                       # Logprobs of the distribution actually sampled (after temperature), the
                       # same quantity the learner computes from logits / temperature.
                       logprobs_mode="processed_logprobs")
        # vLLM's engine core and its workers, when they are processes: deaths we must notice ourselves.
        self._engine_processes = [(p, p.name()) for p in psutil.Process().children(recursive=True)
                                  if p.name().startswith("VLLM")]

    def generate(self, prompts: list[list[int]], sampling: Sampling, mode: str = "train",
                 seeds: list[int] | None = None) -> list[list[dict]]:
        """For each prompt, `sampling.n` completions as {token_ids, logprobs, finish_reason, text};
        truncated rollouts (train mode with `sampling.truncation`) add what rollout/truncation.py lists.

        With `seeds` (one per prompt) each prompt samples from its own generator, so its
        completions do not depend on which engine runs it or what else is in the batch.
        """
        from vllm import SamplingParams, TokensPrompt

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        s = sampling
        if mode == "train" and s.truncation is not None:
            return truncated_rollout(self.llm, prompts, seeds or [None] * len(prompts), s.n, s.temperature, s.top_p,
                                     s.max_new_tokens, s.truncation)

        def params(seed):
            return SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                                  logprobs=0 if s.temperature > 0 else None, seed=seed)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                    [params(seed) for seed in seeds] if seeds is not None else params(None),
                                    use_tqdm=False)
        return [[_completion(c) for c in out.outputs] for out in outputs]

    def load_weights(self, transport: str, handle: str, timeout_s: float) -> None:
        from rollout.weight_sync import TRANSPORTS

        TRANSPORTS[transport].receive(self.llm, handle, timeout_s)
        self.llm.reset_prefix_cache()

    def receive_weights(self, timeout_s: float) -> None:
        """The collective transport's receiving side (rollout/weight_sync.py) on every vLLM worker."""
        self.llm.collective_rpc("prunerl_receive_weights", timeout=timeout_s)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def weight_group_member(self) -> tuple[str, list[str]]:
        """This node's IP and the device type of each vLLM worker: how the collective transport
        places this engine in its group (rollout/weight_sync.py)."""
        import ray

        return ray.util.get_node_ip_address(), self.llm.collective_rpc("prunerl_device_type")

    def worker_rpc(self, method: str, *args, timeout_s: float | None = None) -> list:
        """A `WeightLoader` method (rollout/weight_sync.py) on every vLLM worker of this engine."""
        return self.llm.collective_rpc(method, timeout=timeout_s, args=args)

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


def _deterministic_scheduling(spec: EngineSpec) -> dict:
    """CPU engines prefill every prompt whole: vLLM's CPU runner cannot rewind a request's seeded
    generator after a chunked prefill step ("CPU Generator does not use offset")."""
    if spec.num_gpus:
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(spec.max_model_len, 2048)}


def request_seeds(seed: int, step: int, count: int) -> list[int]:
    """One sampling seed per prompt of a step, from (recipe seed, step, position in the step)."""
    import numpy as np

    return [int(s) for s in np.random.SeedSequence([seed, step]).generate_state(count)] if count else []


def _completion(c) -> dict:
    logprobs = None
    if c.logprobs is not None:
        logprobs = sampled_logprobs(c)
    return {"token_ids": list(c.token_ids), "logprobs": logprobs,
            "finish_reason": c.finish_reason, "text": c.text}


def engine_env(spec: EngineSpec) -> dict[str, str]:
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(spec.cpu_kvcache_gib),
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if spec.runs_in_process else "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


@dataclass
class Generation:
    """A generate call in flight on the engines: what was asked, and which engine runs which prompts."""
    prompts: list[list[int]]
    sampling: Sampling
    mode: str
    seeds: list[int] | None
    shards: dict[int, list[int]]  # engine index -> prompt positions
    refs: dict = field(default_factory=dict)  # engine index -> its call's ObjectRef


def balance(costs: list[float], engines: int) -> list[list[int]]:
    """Positions split into `engines` shards of near-equal total cost: costliest first, each to
    the least loaded shard (ties to the lower index); positions stay in order within a shard."""
    shards, loads = [[] for _ in range(engines)], [0.0] * engines
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        target = min(range(engines), key=lambda i: (loads[i], i))
        shards[target].append(j)
        loads[target] += costs[j]
    return [sorted(shard) for shard in shards]


class RolloutGroup:
    """N engines; prompts are split across them by expected tokens and results come back in prompt order.

    Engines start loading when the group is made; `wait_ready()` waits for them, so the caller
    can start other workers meanwhile. `liveness` is the recipe's `cluster.liveness`; an engine
    that dies is replaced up to `max_replacements` times over the group's life.
    """

    def __init__(self, spec: EngineSpec, engines: int, liveness, max_replacements: int = 0,
                 placed: Callable[[int], dict] | None = None):
        """placed(index): Ray options putting that engine on resources its stage reserved
        (`StagePlacement.options`); None asks Ray for the spec's CPUs/GPUs directly."""
        self.spec, self.liveness, self.replacements_left = spec, liveness, max_replacements
        self.placed = placed or (lambda index: {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus})
        # Brings the latest weights into the engines at the given indices (a replacement gets them
        # the same way). Set by `sync_weights`.
        self.push_weights: Callable[[list[int]], None] | None = None
        self.restarts = [0] * engines  # per engine: how many times it was replaced (varies its seed)
        self.workers = [self._start(i) for i in range(engines)]

    def wait_ready(self) -> RolloutGroup:
        """Wait until every engine has loaded its model; on failure stop them all and raise."""
        try:
            gather([w.ready.remote() for w in self.workers], self.names, "starting rollout engines",
                   self.liveness.startup_timeout_s)
        except BaseException:  # free the engines' resources now: a stage restart waits on them
            self.shutdown()
            raise
        return self

    @property
    def names(self) -> list[str]:
        return [f"rollout engine {i}" for i in range(len(self.workers))]

    def _start(self, index: int):
        spec = replace(self.spec, seed=self.spec.seed + index + 1000 * self.restarts[index])
        actor = ray.remote(RolloutWorker).options(**self.placed(index), max_concurrency=2,
                                                  runtime_env={"env_vars": engine_env(spec)})
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

    def submit(self, prompts: list[list[int]], sampling: Sampling, mode: str = "train", seeds: list[int] | None = None,
               expected_tokens: list[float] | None = None) -> Generation:
        """Start generating (returns at once). `expected_tokens` per prompt balances the engines'
        shares (default: prompt length + max_new_tokens); `seeds` make the samples independent of that split."""
        costs = expected_tokens or [len(p) + sampling.max_new_tokens for p in prompts]
        shards = {i: shard for i, shard in enumerate(balance([sampling.n * c for c in costs], len(self.workers)))
                  if shard}
        generation = Generation(prompts, sampling, mode, seeds, shards)
        for i in shards:
            self._submit_shard(generation, i)
        return generation

    def _submit_shard(self, g: Generation, i: int) -> None:
        shard = g.shards[i]
        g.refs[i] = self.workers[i].generate.remote([g.prompts[j] for j in shard], g.sampling, g.mode,
                                                    [g.seeds[j] for j in shard] if g.seeds else None)

    def wait(self, g: Generation) -> list[list[dict]]:
        """The completions of a submitted generation, in prompt order; a dead engine is replaced
        and its shard generated again."""
        while True:
            try:
                outs = gather(list(g.refs.values()), [self.names[i] for i in g.refs], "generate",
                              self.liveness.call_timeout_s, probe=self.dead_engines,
                              probe_interval_s=self.liveness.probe_interval_s)
                break
            except WorkerFailure as failure:
                for i in self._replace_failed(failure):
                    if i in g.refs:
                        self._submit_shard(g, i)
        results: list = [None] * len(g.prompts)
        for i, out in zip(g.refs, outs):
            for j, completions in zip(g.shards[i], out):
                results[j] = completions
        return results

    def generate(self, prompts: list[list[int]], sampling: Sampling, mode: str = "train",
                 seeds: list[int] | None = None) -> list[list[dict]]:
        return self.wait(self.submit(prompts, sampling, mode, seeds))

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
        if self.push_weights is not None:
            self._push(failed)
        return failed

    def load_weights(self, transport: str, handle: str, timeout_s: float) -> None:
        """Every engine reloads a published weights file; so does a replaced engine, now or later."""
        def reload(indices: list[int]) -> None:
            gather([self.workers[i].load_weights.remote(transport, handle, timeout_s) for i in indices],
                   [self.names[i] for i in indices], "weight sync", timeout_s, probe=self.dead_engines,
                   probe_interval_s=self.liveness.probe_interval_s)
        self.sync_weights(reload)

    def sync_weights(self, push: Callable[[list[int]], None]) -> None:
        """`push` into every engine; a replaced engine (now or later) gets `push([its index])`."""
        self.push_weights = push
        self._push(list(range(len(self.workers))))

    def _push(self, indices: list[int]) -> None:
        try:
            self.push_weights(indices)
        except WorkerFailure as failure:
            replaced = self._replace_failed(failure)  # the replacements get their weights there
            # A push that broke off left the others half-loaded: push into them again.
            rest = [i for i in indices if i not in replaced]
            if rest:
                self._push(rest)

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
