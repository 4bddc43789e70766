"""Recipes load in layers: the schema's defaults, a `base` recipe file, the recipe, then overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from adamerge.app.config import RecipeError, built_in_recipes, load_recipe, resolve_recipe

REPO = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_recipe_overrides_its_base_which_overrides_the_schema(tmp_path):
    write(tmp_path / "shared" / "_base.yaml", "seed: 7\ntrainer: {max_steps: 11, batch_size: 3}\n")
    recipe = write(tmp_path / "r.yaml", "base: shared/_base.yaml\ntrainer: {max_steps: 5}\n")
    loaded = load_recipe(recipe, ["trainer.batch_size=4"])
    assert (loaded.seed, loaded.trainer.max_steps, loaded.trainer.batch_size) == (7, 5, 4)
    assert loaded.trainer.log_every_n_steps == 10  # the schema's default, untouched by either file
    assert "base" not in loaded  # consumed while loading: the saved recipe is complete on its own


def test_bases_chain_and_a_cycle_or_a_missing_base_is_named(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\nseed: 1\n")
    write(tmp_path / "b.yaml", "base: c.yaml\ntrainer: {max_steps: 2}\n")
    write(tmp_path / "c.yaml", "trainer: {max_steps: 3, batch_size: 9}\n")
    loaded = load_recipe(tmp_path / "a.yaml")
    assert (loaded.seed, loaded.trainer.max_steps, loaded.trainer.batch_size) == (1, 2, 9)
    write(tmp_path / "c.yaml", "base: a.yaml\n")
    with pytest.raises(RecipeError, match="form a cycle"):
        load_recipe(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", "base: gone.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"gone.yaml not found \(the base of .*c.yaml\)"):
        load_recipe(tmp_path / "a.yaml")


def test_a_typo_inside_a_base_is_named_like_any_other_key(tmp_path):
    write(tmp_path / "_base.yaml", "trainer: {max_stepz: 3}\n")
    with pytest.raises(RecipeError, match="max_stepz"):
        load_recipe(write(tmp_path / "r.yaml", "base: _base.yaml\n"))


def test_the_text_recipes_share_one_problem_block():
    shared = OmegaConf.load(REPO / "recipes" / "text" / "_minilm_zoo.yaml").problem
    for name in ("text/ties", "text/recommended", "text/fw_hard"):
        recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
        assert recipe.problem.kind == shared.kind == "benchmarks.zoos.problems:text_zoo_problem"
        assert recipe.problem.options.zoo_dir.endswith("/zoo/minilm-text")
    assert load_recipe(REPO / "recipes" / "text" / "recommended.yaml").problem.options.calibration.max_samples == 64
    assert load_recipe(REPO / "recipes" / "text" / "ties.yaml").problem.options.calibration.max_samples == 512
    assert not any(Path(name).name.startswith("_") for name in built_in_recipes())


@pytest.mark.parametrize("override, key, fields", [
    ("coefficients.constraint=clamp", "coefficients.constraint", "['name', 'lo', 'hi']"),
    ("trainer=3", "trainer", "['max_steps'"),
])
def test_a_scalar_given_to_a_section_names_the_key_and_its_fields(override, key, fields):
    with pytest.raises(RecipeError) as caught:
        load_recipe(resolve_recipe("quickstart/adamerging_layerwise"), [override])
    message = str(caught.value)
    assert f": {key} is a section, not a value" in message and fields in message and "\n" not in message
