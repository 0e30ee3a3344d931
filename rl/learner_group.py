"""The learner ranks as Ray actors on the stage's reserved resources; every call fans out to all ranks."""
from __future__ import annotations

from typing import Callable

import ray

from rl.learner import LearnerWorker
from rl.liveness import gather, wait_placement


class LearnerGroup:
    """M ranks in a placement group; every call fans out to all ranks and waits for them, failing
    as soon as one rank fails or dies (see rl/liveness.py). `liveness` is `cluster.liveness`."""

    def __init__(self, model_cfg, stage, total_optimizer_steps: int, seed: int, liveness,
                 placed: Callable[[int], dict] | None = None):
        """placed(rank): Ray options putting that rank on resources the stage reserved
        (`StagePlacement.options`); None reserves the ranks' own placement group."""
        self.liveness, self.workers, self.pg = liveness, [], None
        learner = stage.learner
        world = learner.ranks
        try:
            if placed is None:
                placed = self._reserve(stage, liveness)
            env = {"TOKENIZERS_PARALLELISM": "false"}
            if not learner.num_gpus_per_rank:
                env["DS_ACCELERATOR"] = "cpu"
            actor = ray.remote(LearnerWorker)
            self.workers = [actor.options(**placed(r), runtime_env={"env_vars": env}).remote() for r in range(world)]
            one_node = len(set(self.call("node_id", timeout_s=liveness.startup_timeout_s))) == 1
            addr, port = self.call("rendezvous", one_node, timeout_s=liveness.startup_timeout_s)[0]
            self.call("setup", per_rank_args=[(r, world, addr, port, model_cfg, stage, total_optimizer_steps, seed)
                                              for r in range(world)], timeout_s=liveness.startup_timeout_s)
        except BaseException:
            self.shutdown()
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

    def call(self, method: str, *args, per_rank_args: list | None = None, timeout_s: float | None = None):
        if per_rank_args is not None:
            refs = [getattr(w, method).remote(*a) for w, a in zip(self.workers, per_rank_args)]
        else:
            refs = [getattr(w, method).remote(*args) for w in self.workers]
        return gather(refs, [f"learner rank {r}" for r in range(len(refs))], method,
                      timeout_s or self.liveness.call_timeout_s)

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        try:
            # Ranks leave their process group cleanly when they can; a stuck or dead one is killed.
            ray.wait([w.shutdown.remote() for w in self.workers], num_returns=len(self.workers), timeout=10)
        finally:
            for w in self.workers:
                ray.kill(w)
            if self.pg is not None:
                remove_placement_group(self.pg)
