"""Every closed choice and cross-section rule is checked when the recipe loads: before any
model or data is read, with an error naming the key (the pretrained path here does not exist,
so reaching a model load would raise FileNotFoundError, not RecipeError)."""

from __future__ import annotations

import pytest

from adamerge.app.config import RecipeError, load_recipe

BASE = {"problem": {"kind": "hf_sequence_classification", "pretrained": "/nonexistent/model"}}


@pytest.mark.parametrize("override, key, hint", [
    ("coefficients.granularity=lyer", "coefficients.granularity", "layer"),
    ("coefficients.constraint.name=clamped", "coefficients.constraint.name", "clamp"),
    ("task_balance=lgo", "task_balance", "log"),
    ("optimizer.name=adma", "optimizer.name", "adam"),
    ("task_vectors.dtype=fp8", "task_vectors.dtype", None),
    ("task_vectors.ties.scope=modle", "task_vectors.ties.scope", "model"),
    ("frank_wolfe.lmo=tensr", "frank_wolfe.lmo", "tensor"),
    ("task_vectors.start.method=wdi", "task_vectors.start.method", "wudi"),
    ("method.name=tise", "method.name", "ties"),
    ("objectives=[{name: entropy}, {name: entrophy}]", "objectives[1].name", "entropy"),
    ("selection.objective.name=expert_k", "selection.objective.name", "expert_kl"),
    ("frank_wolfe.inner_granularity=chunks", "frank_wolfe.inner_granularity", "chunk"),
])
def test_a_bad_closed_choice_names_its_key_and_the_closest_value(override, key, hint):
    with pytest.raises(RecipeError) as error:  # not FileNotFoundError: no model was looked for
        load_recipe(BASE, [override])
    message = str(error.value)
    assert key in message and "use one of" in message and "\n" not in message
    assert (f"did you mean {hint!r}" in message) if hint else "did you mean" not in message


@pytest.mark.parametrize("override, message", [
    ("task_balance=lgo", "recipe: task_balance: unknown task balance 'lgo' (did you mean 'log'?); "
                         "use one of ['guarded', 'initial', 'log', 'sum']"),
    ("method.name=tise", "recipe: method.name: unknown merge method 'tise' (did you mean 'ties'?); use one of ["),
    ("objectives=[{name: entrophy}]", "recipe: objectives[0].name: unknown objective 'entrophy' "
                                      "(did you mean 'entropy'?); use one of ['accuracy', 'alignment', "),
])
def test_an_unknown_registered_name_is_reported_in_the_registry_format(override, message):
    with pytest.raises(RecipeError) as error:
        load_recipe(BASE, [override])
    assert str(error.value).startswith(message)


def test_an_objective_path_is_imported_when_built_and_element_is_not_a_soft_fw_granularity():
    assert load_recipe(BASE, ["objectives=[{name: mypkg.losses:margin}]"]).objectives[0].name == "mypkg.losses:margin"
    with pytest.raises(RecipeError, match=r"frank_wolfe\.inner_granularity is 'element'; soft FW-Merging takes one of \['task', "):
        load_recipe(BASE, ["frank_wolfe.inner_granularity=element"])


@pytest.mark.parametrize("sections, message", [
    ({"method": {"name": "ties"}, "selection": {}}, "cannot be combined with `selection`"),
    ({"method": {"name": "ties"}, "frank_wolfe": {}}, "cannot be combined with `frank_wolfe`"),
    ({"frank_wolfe": {}, "progressive": {}}, "not both"),
    ({"progressive": {}, "task_balance": "guarded"}, "no `selection` or `task_balance`"),
    ({"progressive": {}, "task_vectors": {"dare": {}}}, "ties/dare"),
    ({"progressive": {}, "objectives": [], "task_vectors": {"start": {"method": "dare"}}}, "'dare' needs the whole model"),
    ({"progressive": {}, "coefficients": {"granularity": "task"}}, "spans every block"),
    ({"progressive": {}, "coefficients": {"granularity": "chunk", "chunks": {"importance_from": "x", "budget": 2}}},
     "not importance_from"),
    ({"coefficients": {"granularity": "layer", "chunks": 2}}, "only used with granularity 'chunk'"),
    ({"coefficients": {"granularity": "task", "groups": "block"}}, "only used with granularity 'group'"),
    ({"coefficients": {"constraint": {"lo": 0.0}}}, "lo/hi need a constraint name"),
    ({"progressive": {}, "coefficients": {"granularity": "spectral"}}, "'spectral' needs each expert's SVD"),
    ({"coefficients": {"granularity": "layer", "rank": 2}}, "coefficients.rank is only used with granularity 'spectral'"),
    ({"frank_wolfe": {"mode": "soft", "inner_granularity": "spectral"}}, "inner_granularity is 'spectral'; soft FW"),
])
def test_sections_that_exclude_each_other_are_refused_at_load(sections, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe({**BASE, **sections})


def test_a_good_recipe_passes_and_stays_read_only():
    recipe = load_recipe(BASE, ["coefficients.granularity=element", "progressive.epochs=3", "objectives=[]"])
    assert recipe.coefficients.granularity == "element" and recipe.progressive.epochs == 3
    adarank = load_recipe(BASE, ["coefficients.granularity=spectral", "coefficients.rank=8", "coefficients.constraint.name=mask"])
    assert adarank.coefficients.rank == 8 and adarank.coefficients.constraint.name == "mask"
    from omegaconf import OmegaConf

    assert OmegaConf.is_readonly(recipe)


@pytest.mark.parametrize("overrides, message", [
    (["progressive.epochs=1", "objectives=[]", "trainer.max_steps=2"],
     "trainer.max_steps is set, but the progressive learner does not use it (it trains progressive.epochs"),
    (["progressive.epochs=1", "objectives=[]", "trainer.precision=bf16-true"],
     "trainer.precision is set, but the progressive learner does not use it (it runs its own loop on one device in float32)"),
    (["progressive.epochs=1", "objectives=[]", "trainer.devices=2"], "trainer.devices is 2, but the progressive learner runs on one device"),
    (["progressive.epochs=1"], "objectives lists an objective, but progressive learning"),
    (["frank_wolfe.iterations=1", "trainer.max_steps=2"], "trainer.max_steps is set, but the frank_wolfe learner does not use it"),
    (["frank_wolfe.iterations=1", "trainer.loggers=[{class_path: x.Y}]"], "trainer.loggers is set, but the frank_wolfe learner"),
    (["frank_wolfe.iterations=1", "trainer.strategy=ddp"], "trainer.strategy is set, but the frank_wolfe learner"),
])
def test_a_trainer_field_the_learner_would_ignore_is_refused_at_load_naming_both(overrides, message):
    with pytest.raises(RecipeError) as caught:
        load_recipe(BASE, overrides)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_lightning_learner_honours_every_trainer_field_and_the_others_the_common_ones():
    every = ["trainer.max_steps=2", "trainer.precision=bf16-true", "trainer.devices=2", "trainer.strategy=ddp",
             "trainer.log_every_n_steps=1", "trainer.per_task_backward=true", "trainer.extra={gradient_clip_val: 1.0}"]
    assert load_recipe(BASE, every).trainer.max_steps == 2
    common = ["trainer.batch_size=3", "trainer.threads=1", "trainer.progress_bar=false", "trainer.tf32=false",
              "trainer.accelerator=cpu", "trainer.devices=[0]"]
    assert load_recipe(BASE, ["progressive.epochs=1", "objectives=[]", *common]).trainer.batch_size == 3
    assert load_recipe(BASE, ["frank_wolfe.iterations=1", *common]).trainer.tf32 is False
    assert load_recipe(BASE, ["optimizer.name=cmaes", *common]).trainer.threads == 1


CMAES = ["optimizer.name=cmaes"]


@pytest.mark.parametrize("overrides, message", [
    (["coefficients.granularity=element"], "recipe: coefficients.granularity is 'element' (one coefficient per entry); "
                                           "CMA-ES searches at most 1000: use task, layer, group or chunk"),
    (["optimizer.args={popsize: 8, lr: 0.1}"], "recipe: optimizer.args.lr is not a CMA-ES argument; "
                                               "use ['popsize', 'sigma0', 'generations']"),
    (["optimizer.args.generations=0"], "recipe: optimizer.args.generations is 0; use an integer >= 1"),
    (["progressive.epochs=1", "objectives=[]"], "recipe: optimizer.name cmaes searches the coefficients itself; "
                                                "it cannot be combined with `progressive`"),
    (["selection.every_n_steps=5"], "it cannot be combined with `selection`"),
    (["objectives=[{name: accuracy}, {name: entropy}]"], "recipe: objectives[0].name scores each task's validation rows; "
                                                         "list it alone in objectives"),
    (["trainer.max_steps=2"], "trainer.max_steps is set, but the cmaes learner does not use it (it runs optimizer.args.generations)"),
])
def test_what_cmaes_cannot_search_is_refused_at_load_naming_the_field(overrides, message):
    with pytest.raises(RecipeError) as caught:
        load_recipe(BASE, [*CMAES, *overrides])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_accuracy_and_cmaes_arguments_belong_to_cmaes():
    with pytest.raises(RecipeError, match=r"^recipe: objectives\[0\]\.name is 'accuracy', which has no gradient: only "
                                          r"optimizer\.name cmaes searches it$"):
        load_recipe(BASE, ["objectives=[{name: accuracy}]"])
    with pytest.raises(RecipeError, match=r"^recipe: optimizer\.args are CMA-ES's; optimizer\.name is 'adam'"):
        load_recipe(BASE, ["optimizer.args={popsize: 8}"])
    recipe = load_recipe(BASE, [*CMAES, "objectives=[{name: accuracy}]", "optimizer.args={popsize: 8, sigma0: 0.3}"])
    assert recipe.optimizer.args == {"popsize": 8, "sigma0": 0.3}
