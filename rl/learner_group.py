"""The learner ranks as Ray actors on the stage's reserved resources; every call fans out to all ranks."""
from __future__ import annotations

from typing import Callable

import ray

from rl.learner import LearnerWorker
from rl.liveness import gather, wait_placement


class RankGroup:
    """One Ray actor of `worker_cls` (a `rl.deepspeed_worker.DeepSpeedWorker`) per rank, joined in one
    process group; every call fans out to all ranks and waits for them, failing as soon as one rank
    fails or dies (see rl/liveness.py). `placed(rank)`: the rank's Ray options (resources and
    placement); `setup_args(rank, address, port)`: the arguments of its `setup`."""

    def __init__(self, worker_cls, label: str, world: int, gpus: bool, liveness, placed: Callable[[int], dict],
                 setup_args: Callable[[int, str, int], tuple]):
        self.label, self.liveness, self.workers = label, liveness, []
        env = {"TOKENIZERS_PARALLELISM": "false"}
        if not gpus:
            env["DS_ACCELERATOR"] = "cpu"
        actor = ray.remote(worker_cls)
        try:
            self.workers = [actor.options(**placed(r), runtime_env={"env_vars": env}).remote() for r in range(world)]
            startup = liveness.startup_timeout_s
            one_node = len(set(self.call("node_id", timeout_s=startup))) == 1
            address, port = self.call("rendezvous", one_node, timeout_s=startup)[0]
            self.call("setup", per_rank_args=[setup_args(r, address, port) for r in range(world)], timeout_s=startup)
        except BaseException:
            self.shutdown()
            raise

    @property
    def world_size(self) -> int:
        return len(self.workers)

    def call(self, method: str, *args, per_rank_args: list | None = None, timeout_s: float | None = None):
        arguments = per_rank_args if per_rank_args is not None else [args] * len(self.workers)
        refs = [getattr(w, method).remote(*a) for w, a in zip(self.workers, arguments)]
        return gather(refs, [f"{self.label} rank {r}" for r in range(len(refs))], method,
                      timeout_s or self.liveness.call_timeout_s)

    def shutdown(self) -> None:
        try:
            # Ranks leave their process group cleanly when they can; a stuck or dead one is killed.
            ray.wait([w.shutdown.remote() for w in self.workers], num_returns=len(self.workers), timeout=10)
        finally:
            for w in self.workers:
                ray.kill(w)


class LearnerGroup(RankGroup):
    """The GRPO learner ranks of an RL stage."""

    def __init__(self, model_cfg, stage, total_optimizer_steps: int, seed: int, liveness,
                 placed: Callable[[int], dict] | None = None):
        """placed(rank): Ray options putting that rank on resources the stage reserved
        (`StagePlacement.options`); None reserves the ranks' own placement group."""
        learner, self.pg = stage.learner, None
        world = learner.ranks
        try:
            super().__init__(LearnerWorker, "learner", world, learner.num_gpus_per_rank > 0, liveness,
                             placed or self._reserve(stage, liveness),
                             lambda r, address, port: (r, world, address, port, model_cfg, stage,
                                                       total_optimizer_steps, seed))
        except BaseException:
            self._release()
            raise

    def _reserve(self, stage, liveness) -> Callable[[int], dict]:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        learner = stage.learner
        bundle = {"CPU": learner.num_cpus_per_rank}
        if learner.num_gpus_per_rank:
            bundle["GPU"] = learner.num_gpus_per_rank
        self.pg = placement_group([bundle] * learner.ranks, strategy="PACK")
        wait_placement(self.pg, f"stage '{stage.name}' learners", [bundle] * learner.ranks, liveness.startup_timeout_s)
        return lambda r: {"num_cpus": learner.num_cpus_per_rank, "num_gpus": learner.num_gpus_per_rank,
                          "scheduling_strategy": PlacementGroupSchedulingStrategy(
                              placement_group=self.pg, placement_group_bundle_index=r)}

    def shutdown(self) -> None:
        try:
            super().shutdown()
        finally:
            self._release()

    def _release(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
