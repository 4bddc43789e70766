"""mergekit out: a data-free run writes the mergekit config of its method (per-tensor weights on the
merged tensors, the base's values elsewhere), or says in mergekit.txt why there is none. That
mergekit itself reproduces what is written is checked in test_mergekit_recipe.py."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from adamerge.app import runner  # noqa: E402
from adamerge.app.problems import build_problem  # noqa: E402
from adamerge.io.checkpoints import open_weights  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def weight_of(filters, name):
    """mergekit's rule: the first filter that is a substring of the tensor's name, else the catch-all."""
    return next(f["value"] for f in filters if "filter" not in f or f["filter"] in name)


MERGEKIT_CASES = {  # method args -> (mergekit method, weight per expert, per-model parameters, global parameters)
    "task_arithmetic": ({"scaling": [0.2, 0.5]}, "task_arithmetic", [0.2, 0.5], {}, {"normalize": False}),
    "ties": ({"density": 0.3, "scaling": 0.8, "trim_scope": "tensor"}, "ties", [1.0, 1.0], {"density": 0.3},
             {"normalize": True, "lambda": 0.8}),
    "dare": ({"density": 0.6, "scaling": 0.4}, "dare_linear", [0.4, 0.4], {"density": 0.6}, {"normalize": False}),
    "dare_ties": ({"density": 0.6, "scaling": 0.4, "sign_election": True}, "dare_ties", [1.0, 1.0], {"density": 0.6},
                  {"normalize": True, "lambda": 0.4}),
    "average": ({}, "linear", [1.0, 1.0], {}, {"normalize": True}),
}


@pytest.mark.parametrize("case", sorted(MERGEKIT_CASES))
def test_data_free_merges_write_the_mergekit_equivalent(zoo, named_zoo, zoo_recipe, tmp_path, case):
    from omegaconf import OmegaConf

    args, method, weights, per_model, parameters = MERGEKIT_CASES[case]
    name = "dare" if case == "dare_ties" else case
    result = runner.merge(zoo_recipe(zoo, named_zoo, tmp_path, case, method={"name": name, "args": args}))
    config = OmegaConf.to_container(OmegaConf.load(result.run_dir / "mergekit.yaml"))
    assert config["merge_method"] == method and config["parameters"] == parameters and config["dtype"] == "float32"
    experts = [str(named_zoo / "zoo" / t) for t in ("a", "b")]
    base = open_weights(str(zoo / "base"))
    scope = [k for k in base if k.startswith("bert.")]
    models = config["models"]
    if method == "linear":  # the base is a member, weighted only outside the merge: those tensors stay the base's
        assert "base_model" not in config and models[-1]["model"] == str(zoo / "base")
        assert all(weight_of(models[-1]["parameters"]["weight"], k) == (0.0 if k in scope else 1.0) for k in base)
        models = models[:-1]
    else:
        assert config["base_model"] == str(zoo / "base")
    assert [m["model"] for m in models] == experts
    for model, weight in zip(models, weights):
        assert {k: v for k, v in model["parameters"].items() if k != "weight"} == per_model
        for key in base:
            assert weight_of(model["parameters"]["weight"], key) == (weight if key in scope else 0.0), key
    note = (result.run_dir / "mergekit.txt").read_text()  # expert heads of 2 and 3 classes: left out, said why
    assert "classifier.bias, classifier.weight" in note and "base (2,), a (2,), b (3,)" in note
    assert ("in distribution" in note) == (name == "dare")


@pytest.mark.parametrize("method, args, reason", [
    ("ties", {"density": 0.3}, "trim_scope 'model'"),
    ("tsv", {}, "`tsv` has no mergekit equivalent"),
])
def test_merges_without_a_mergekit_equivalent_say_why(zoo, named_zoo, zoo_recipe, tmp_path, method, args, reason):
    result = runner.merge(zoo_recipe(zoo, named_zoo, tmp_path, method, method={"name": method, "args": args}))
    assert not (result.run_dir / "mergekit.yaml").exists()
    assert reason in (result.run_dir / "mergekit.txt").read_text()


def test_mergekit_skips_a_bare_encoder_base_saying_why(zoo, named_zoo, zoo_recipe):
    from dataclasses import replace

    from adamerge.app.mergekit.write import method_mergekit_config

    problem = build_problem(zoo_recipe(zoo, named_zoo, "unused", "x").problem)
    bare = replace(problem, description={**problem.description, "base": str(zoo / "encoder_only")})
    config, reason = method_mergekit_config("task_arithmetic", {}, bare, {"include": problem.include, "exclude": None})
    assert config is None and "bare encoder" in reason
    config, note = method_mergekit_config("task_arithmetic", {}, problem, {"include": problem.include, "exclude": None})
    assert config is not None and "classifier.weight" in note
