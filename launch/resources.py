"""Can the cluster hold each stage's workers? Checked after joining Ray, before any actor starts.

Ray waits silently, forever, for resources that no node has: this turns that into one line per
problem, naming the stage's field and what the cluster offers.
"""
from __future__ import annotations

KINDS = ("CPU", "GPU")


def stage_demands(stage) -> list[tuple[str, int, dict[str, float]]]:
    """(field path, count, resources of one worker) for each kind of worker a stage starts."""
    return [(w.path, w.count, {"CPU": w.cpus, "GPU": w.gpus}) for w in stage.workers()]


def resource_problems(recipe, nodes: list[dict[str, float]]) -> list[str]:
    """nodes: each alive node's total resources (`ray.nodes()[i]["Resources"]`)."""
    totals = {k: sum(n.get(k, 0.0) for n in nodes) for k in KINDS}
    offer = ", ".join(f"{totals[k]:g} {k}" for k in KINDS) + f" on {len(nodes)} node(s)"
    problems = []
    for stage in recipe.stages:
        demands = stage_demands(stage)
        unplaceable = [f"{path}: each worker needs {amount:g} {kind}, but no node of the Ray cluster has that much "
                       f"(cluster: {offer})"
                       for path, _, worker in demands for kind, amount in worker.items()
                       if amount > 0 and not any(n.get(kind, 0.0) >= amount for n in nodes)]
        problems += unplaceable
        for kind in KINDS if not unplaceable else ():
            needed = sum(count * worker[kind] for _, count, worker in demands)
            if needed > totals[kind]:
                problems.append(f"stages.{stage.name}: its workers need {needed:g} {kind} together, the Ray cluster "
                                f"has {totals[kind]:g} {kind} on {len(nodes)} node(s); lower the per-worker resources "
                                f"or the number of ranks/engines")
    return problems
