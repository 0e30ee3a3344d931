"""Where `prunerl run` puts a run, and how it refuses a run directory it cannot use."""
import pytest

from conftest import REPO
from launch.cli import RUN_ROOT_ENV, main, pick_run_dir, run_root
from launch.config import RecipeError, load_recipe

QUICKSTART = REPO / "recipes" / "quickstart.yaml"


@pytest.fixture
def recipe(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv(RUN_ROOT_ENV, raising=False)
    return load_recipe(QUICKSTART)


def test_run_root_precedence(recipe, tmp_path, monkeypatch):
    assert run_root(recipe) == REPO / "runs"
    monkeypatch.setenv(RUN_ROOT_ENV, str(tmp_path / "from-env"))
    assert run_root(recipe) == tmp_path / "from-env"
    recipe.cluster.run_root = str(tmp_path / "from-recipe")
    assert run_root(recipe) == tmp_path / "from-recipe"


def test_a_ray_job_does_not_write_into_its_package_cache(recipe, tmp_path, monkeypatch):
    cache = tmp_path / "ray" / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    cache.mkdir(parents=True)
    monkeypatch.chdir(cache)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert run_root(recipe) == tmp_path / "home" / "prunerl-runs"


def test_two_runs_started_in_the_same_second_get_their_own_folders(recipe, tmp_path):
    recipe.cluster.run_root = str(tmp_path)
    first, second = pick_run_dir(recipe, None, False), pick_run_dir(recipe, None, False)
    assert first != second and first.is_dir() and second.is_dir()
    assert pick_run_dir(recipe, None, True) == max(first, second)  # --resume: the newest


def test_run_dir_that_is_a_file(recipe, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(RecipeError, match="is a file, not a folder"):
        pick_run_dir(recipe, str(blocker), False)
    assert main(["run", str(QUICKSTART), "--run-dir", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: --run-dir: {blocker} is a file, not a folder"


def test_unwritable_run_root_is_one_line(recipe, capsys):
    assert main(["run", str(QUICKSTART), "--run-dir", "/proc/prunerl-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run directory:") and len(err.strip().splitlines()) == 1


def test_a_job_command_keeps_overrides_with_spaces_whole(recipe, tmp_path):
    """`prunerl submit` and the RayJob run this command through a shell: each argument arrives whole."""
    import shlex

    from launch.cli import build_parser, run_command

    overrides = ["data.system_prompt=Think it through, then answer.", "stages.train.steps=3"]
    command = run_command("recipes/quickstart.yaml", overrides, str(tmp_path / "my run"))
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "launch"]
    args = build_parser().parse_args(argv[3:])
    assert (args.recipe, args.overrides, args.run_dir) == ("recipes/quickstart.yaml", overrides, str(tmp_path / "my run"))
    assert load_recipe(QUICKSTART, args.overrides).data.system_prompt == "Think it through, then answer."
