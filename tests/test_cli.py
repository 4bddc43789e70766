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

from adamerge import cli  # noqa: E402
from adamerge.checkpoints import open_weights  # noqa: E402
from adamerge.coefficients import GRANULARITIES  # noqa: E402
from adamerge.config import RecipeError, load_recipe  # noqa: E402
from adamerge.methods import get_method  # noqa: E402
from adamerge.objectives import resolve_objective  # noqa: E402
from adamerge.problems import PROBLEM_BUILDERS  # noqa: E402
from test_runner import build_text_zoo, recipe_dict  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


# ---------------------------------------------------------------------- recipes


def test_there_are_built_in_recipes():
    assert len(RECIPES) >= 6


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_built_in_recipe_loads_and_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, DictConfig) and OmegaConf.is_readonly(recipe)
    text = OmegaConf.to_yaml(recipe)
    assert "${" not in text  # fully resolved
    assert recipe.problem.kind in PROBLEM_BUILDERS or ":" in recipe.problem.kind
    assert recipe.coefficients.granularity in GRANULARITIES
    if recipe.method is not None:
        get_method(recipe.method.name)
    else:
        for objective in recipe.objectives:
            resolve_objective(objective.name)


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


def test_missing_recipe_file_errors_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no recipe file '.*nope\.yaml'.*adamerge recipes"):
        cli.main(["fit", str(tmp_path / "nope.yaml")])


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_text_zoo(tmp_path_factory)


def test_cli_fit_with_overrides_then_eval(zoo, tmp_path, capsys):
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
