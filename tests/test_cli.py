"""Recipes (schema validation, errors that name the key) and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from omegaconf import DictConfig, OmegaConf  # noqa: E402

from adamerge.app import cli  # noqa: E402
from adamerge.io.checkpoints import open_weights  # noqa: E402
from adamerge.core.granularities import GRANULARITIES  # noqa: E402
from adamerge.app.config import RecipeError, load_recipe  # noqa: E402
from adamerge.methods import METHODS  # noqa: E402
from adamerge.objectives import OBJECTIVES  # noqa: E402
from adamerge.app.problems import PROBLEM_KINDS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if not p.name.startswith("_"))  # _*: shared bases


# ---------------------------------------------------------------------- recipes


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_built_in_recipe_starts_with_the_command_that_runs_it(path):
    """As the README says: `adamerge merge` for a data-free `method`, `adamerge fit` otherwise,
    with an argument that resolves to this very file (a path from the repository or a built-in name)."""
    words = path.read_text().splitlines()[0].split()
    job = "merge" if load_recipe(path).method is not None else "fit"
    assert words[:3] == ["#", "adamerge", job], words
    argument = words[3].removeprefix("recipes/")
    assert cli.resolve_recipe(argument).resolve() == path.resolve()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_built_in_recipe_loads_and_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, DictConfig) and OmegaConf.is_readonly(recipe)
    text = OmegaConf.to_yaml(recipe)
    assert "${" not in text  # fully resolved
    assert recipe.problem.kind in PROBLEM_KINDS or ":" in recipe.problem.kind
    assert recipe.coefficients.granularity in GRANULARITIES
    if recipe.method is not None:
        METHODS.get(recipe.method.name)
    else:
        for objective in recipe.objectives:
            OBJECTIVES.get(objective.name)


@pytest.mark.parametrize(
    "recipe,key",
    [
        ({"trainer": {"max_step": 5}}, "max_step"),
        ({"objective": [{"name": "entropy"}]}, "objective"),
        ({"problem": {"tasks": {"a": {"calibraton": {"path": "x"}}}}}, "calibraton"),
        ({"objectives": [{"name": "entropy", "wieght": 2}]}, "wieght"),
        ({"trainer": {"max_steps": "lots"}}, "trainer.max_steps"),
        ({"optimizer": {"lr": "fast"}}, "optimizer.lr"),
        ({"problem": {"tasks": {"a": {"weight": "heavy"}}}}, "weight"),
    ],
    ids=["unknown-nested", "unknown-top", "unknown-deep", "unknown-in-list", "type-int", "type-float", "type-deep"],
)
def test_bad_recipes_raise_recipe_error_naming_the_key(recipe, key):
    with pytest.raises(RecipeError, match=key):
        load_recipe(recipe)


def test_overrides():
    recipe = load_recipe({"name": "x"}, ["trainer.max_steps=7", "optimizer.lr=0.5", "coefficients.init=[0.1,0.2]"])
    assert recipe.trainer.max_steps == 7 and recipe.optimizer.lr == 0.5 and list(recipe.coefficients.init) == [0.1, 0.2]
    assert recipe.output_dir == "runs/x"  # interpolations resolved
    with pytest.raises(RecipeError, match="trainer.max_step"):
        load_recipe(None, ["trainer.max_step=3"])
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(None, ["trainer.max_steps"])
    with pytest.raises(RecipeError, match="trainer.max_steps"):
        load_recipe(None, ["trainer.max_steps=soon"])
    with pytest.raises(FileNotFoundError, match="no_such_recipe.yaml"):
        load_recipe("no_such_recipe.yaml")


# ---------------------------------------------------------------------- command line


def test_python_m_adamerge_recipes_lists_the_built_in_recipes():
    done = subprocess.run(
        [sys.executable, "-m", "adamerge", "recipes"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr
    expected = sorted(str(p.relative_to(REPO / "recipes").with_suffix("")) for p in RECIPES)
    assert done.stdout.split() == expected
    assert "text/adamerging_layerwise" in expected
    assert cli.resolve_recipe("text/ties") == REPO / "recipes" / "text" / "ties.yaml"


def test_version_prints_the_package_version(capsys):
    import importlib.metadata

    import adamerge

    with pytest.raises(SystemExit) as stopped:
        cli.main(["--version"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out == f"adamerge {adamerge.__version__}\n"
    assert adamerge.__version__ == importlib.metadata.version("adamerge")  # the code's and the package's agree


def test_missing_recipe_file_errors_clearly(tmp_path, capsys):
    assert cli.main(["fit", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no recipe file ") and "nope.yaml" in err and "adamerge recipes" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------------- exit status and messages


def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer: {max_stepz: 3}\n")
    assert cli.main(["fit", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "max_stepz" in err and "Traceback" not in err

    path.write_text("problem: {tasks: {'../x': {}}}\n")
    assert cli.main(["merge", str(path)]) == 2
    assert "problem.tasks name '../x' is not allowed" in capsys.readouterr().err

    monkeypatch.setattr("adamerge.app.runner.evaluate_run", lambda run_dir: {}[run_dir])  # a KeyError, but not ours
    assert cli.main(["eval", str(tmp_path)]) == 1


@pytest.mark.parametrize("how", ["flag before", "flag after", "environment"])
def test_debug_shows_the_traceback_of_user_errors(tmp_path, capsys, monkeypatch, how):
    missing = str(tmp_path / "nope.yaml")
    if how == "environment":
        monkeypatch.setenv("ADAMERGE_DEBUG", "1")
    argv = {"flag before": ["--debug", "fit", missing], "flag after": ["fit", missing, "--debug"]}.get(how, ["fit", missing])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("error: no recipe file")


def test_unexpected_errors_exit_1_with_the_traceback(tmp_path, capsys, monkeypatch):
    def broken(recipe):
        return int("not a number")  # a ValueError, raised outside adamerge's own checks

    monkeypatch.setattr("adamerge.app.runner.merge", broken)
    path = tmp_path / "r.yaml"
    path.write_text("method: {name: task_arithmetic}\n")
    assert cli.main(["merge", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "invalid literal for int()" in err


def test_sigterm_during_fit_exits_non_zero_and_leaves_a_resumable_partial_run(zoo, recipe_dict, tmp_path):
    import signal
    import time

    from adamerge.app.rundir import resume_point

    recipe = recipe_dict(zoo, tmp_path, name="long")
    recipe["trainer"].update(max_steps=100_000, checkpoint_every_n_steps=1)
    recipe["export"] = {"plot": False}
    path = tmp_path / "long.yaml"
    OmegaConf.save(OmegaConf.create(recipe), path)
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}
    process = subprocess.Popen([sys.executable, "-m", "adamerge", "fit", str(path)], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "long.partial" / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 120
        while not last.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == cli.SIGTERM_STATUS, err[-2000:]
    assert "error: stopped by SIGTERM" in err
    work_dir = tmp_path / "long.partial"
    assert not (work_dir / "lock").exists() and not (tmp_path / "long").exists()
    assert resume_point(load_recipe(path), work_dir) == last


def test_cli_fit_with_overrides_then_eval(zoo, recipe_dict, tmp_path, capsys):
    recipe = recipe_dict(zoo, tmp_path / "runs", name="from-file")
    recipe["export"] = {"plot": False}
    path = tmp_path / "tiny.yaml"
    OmegaConf.save(OmegaConf.create(recipe), path)
    assert cli.main(["fit", str(path), "trainer.max_steps=2", "name=cli-run", "coefficients.granularity=task"]) == 0
    run = tmp_path / "runs" / "cli-run"
    out = capsys.readouterr().out
    assert f"run directory: {run}" in out and "| cli-run |" in out
    saved = load_recipe(run / "recipe.yaml")
    assert saved.trainer.max_steps == 2 and saved.name == "cli-run" and saved.coefficients.granularity == "task"
    results = json.loads((run / "eval.json").read_text())

    assert cli.main(["eval", str(run)]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):]) == results


def test_cli_merge_runs_a_built_in_text_zoo_recipe(zoo, tmp_path, capsys):
    overrides = [
        f"problem.pretrained={zoo / 'base'}",
        f"problem.options.data_root={zoo / 'data'}",
        f"problem.options.zoo_dir={zoo / 'zoo'}",
        f"output_dir={tmp_path / 'average'}",
        "problem.max_length=32",
    ]
    assert cli.main(["merge", "text/average", *overrides]) == 0
    assert "| text-average |" in capsys.readouterr().out
    results = json.loads((tmp_path / "average" / "eval.json").read_text())
    assert sorted(results) == ["a", "b"] and results["a"]["samples"] == 20
    merged = dict(open_weights(str(tmp_path / "average" / "merged")))
    base, a, b = (dict(open_weights(str(p))) for p in (zoo / "base", zoo / "zoo" / "a", zoo / "zoo" / "b"))
    key = "encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(merged[key], (a["bert." + key] + b["bert." + key]) / 2)
    assert not torch.allclose(merged[key], base["bert." + key])


@pytest.mark.parametrize("kind", sorted(cli.TEMPLATES))
def test_init_writes_a_valid_recipe_with_one_task_per_expert(kind, tmp_path, capsys):
    out = tmp_path / "mine.yaml"
    assert cli.main(["init", kind, "--pretrained", "base/model", "--expert", "alpha=ex/alpha", "--expert", "beta=ex/beta",
                     "--data", "alpha=data/alpha", "--out", str(out)]) == 0
    recipe = load_recipe(str(out))
    assert recipe.problem.pretrained == "base/model" and list(recipe.problem.tasks) == ["alpha", "beta"]
    assert recipe.problem.tasks.beta.expert == "ex/beta"
    assert recipe.problem.tasks.alpha.calibration.path == "data/alpha" and recipe.problem.tasks.beta.calibration.path == "path/to/beta"
    assert out.read_text().startswith(f"# adamerge fit {out}\n")
    assert cli.main(["init", kind, "--pretrained", "p", "--expert", "alpha=x", "--out", str(out)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--expert", "alpha"], "--expert 'alpha': expected NAME=PATH"),
    (["--expert", "a=x", "--data", "b=y"], "--data b: no --expert of that name"),
    (["--expert", "../a=x"], "--expert"),
])
def test_init_names_its_bad_flags(flags, message, tmp_path, capsys):
    assert cli.main(["init", "causal_lm", "--pretrained", "p", *flags, "--out", str(tmp_path / "r.yaml")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "r.yaml").exists()
