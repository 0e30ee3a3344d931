"""The cluster-capacity check that runs before any actor starts."""
from launch.config import load_recipe
from launch.resources import resource_problems

QUICKSTART = "recipes/quickstart.yaml"
TWO_CPUS = [{"CPU": 2.0, "memory": 1e10}]


def test_quickstart_fits_a_two_cpu_node():
    assert resource_problems(load_recipe(QUICKSTART), TWO_CPUS) == []


def test_a_gpu_engine_on_a_cpu_cluster_names_the_stage_field():
    recipe = load_recipe(QUICKSTART, ["stages.train.rollout.num_gpus_per_engine=1"])
    assert resource_problems(recipe, TWO_CPUS) == [
        "stages.train.rollout: each worker needs 1 GPU, but no node of the Ray cluster has that much "
        "(cluster: 2 CPU, 0 GPU on 1 node(s))"]


def test_workers_that_fit_one_by_one_but_not_together():
    recipe = load_recipe(QUICKSTART, ["stages.train.learner.ranks=3"])
    [problem] = resource_problems(recipe, TWO_CPUS)
    assert problem.startswith("stages.train: its workers need 4 CPU together, the Ray cluster has 2 CPU")


def test_a_worker_bigger_than_any_node_even_if_the_cluster_total_is_enough():
    recipe = load_recipe(QUICKSTART, ["stages.train.learner.num_cpus_per_rank=3"])
    nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    assert resource_problems(recipe, nodes) == [
        "stages.train.learner: each worker needs 3 CPU, but no node of the Ray cluster has that much "
        "(cluster: 4 CPU, 0 GPU on 2 node(s))"]
