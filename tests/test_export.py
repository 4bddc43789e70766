"""What a run exports, opened with the other tools' own loaders: per-task Hugging Face classifiers
(``from_pretrained``, ``pipeline``), the model card (``huggingface_hub``), mergekit YAMLs."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from adamerge.app import runner  # noqa: E402
from adamerge.app.config import load_recipe  # noqa: E402
from adamerge.tasks.hf import SequenceClassificationTask  # noqa: E402
from adamerge.app.problems import build_problem  # noqa: E402
from test_runner import build_text_zoo  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LABEL_NAMES = {"a": ["neg", "pos"], "b": ["no", "maybe", "yes"]}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_text_zoo(tmp_path_factory)


@pytest.fixture(scope="module")
def named_zoo(zoo, tmp_path_factory):
    """The tiny text zoo with label names: in each expert's config (id2label/label2id) and in each
    task's meta.json (label_names)."""
    root = tmp_path_factory.mktemp("named_zoo")
    shutil.copytree(zoo / "zoo", root / "zoo")
    shutil.copytree(zoo / "data", root / "data")
    for task, names in LABEL_NAMES.items():
        file = root / "zoo" / task / "config.json"
        config = json.loads(file.read_text())
        config["id2label"] = {str(i): name for i, name in enumerate(names)}
        config["label2id"] = {name: i for i, name in enumerate(names)}
        file.write_text(json.dumps(config))
        (root / "data" / task / "meta.json").write_text(json.dumps({"pair": task == "b", "label_names": names}))
    return root


def zoo_recipe(zoo, named_zoo, out, name, **sections):
    recipe = {
        "name": name,
        "output_dir": f"{out}/{name}",
        "problem": {
            "kind": "text_zoo",
            "pretrained": str(zoo / "base"),
            "max_length": 32,
            "options": {"data_root": str(named_zoo / "data"), "zoo_dir": str(named_zoo / "zoo")},
        },
        "coefficients": {"granularity": "layer", "init": 0.3},
        "optimizer": {"lr": 0.05},
        "trainer": {"max_steps": 3, "batch_size": 4, "checkpoint_every_n_steps": 2, "progress_bar": False,
                    "log_every_n_steps": 1, "accelerator": "cpu"},
    }
    recipe.update(sections)
    return load_recipe(recipe)


@pytest.fixture(scope="module")
def fitted(zoo, named_zoo, tmp_path_factory):
    recipe = zoo_recipe(zoo, named_zoo, tmp_path_factory.mktemp("runs"), "ada")
    return recipe, runner.fit(recipe)


def read_rows(named_zoo, task):
    return [json.loads(line) for line in (named_zoo / "data" / task / "test.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------- per-task Hugging Face folders


def test_each_task_exports_a_classifier_transformers_opens_with_the_merged_logits(fitted, named_zoo):
    from transformers import AutoModelForSequenceClassification, pipeline

    recipe, result = fitted
    problem = build_problem(recipe.problem)
    merged = result.merged.eval()
    params = merged.merged_parameters()
    evaluation = json.loads((result.run_dir / "eval.json").read_text())
    for task, names in LABEL_NAMES.items():
        folder = result.run_dir / "merged" / "tasks" / task
        model, info = AutoModelForSequenceClassification.from_pretrained(str(folder), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        assert type(model).__name__ == "BertForSequenceClassification"
        assert model.config.num_labels == len(names)
        assert model.config.id2label == dict(enumerate(names))

        batch = problem.collate([problem.evaluation[task][i] for i in range(6)])
        with torch.no_grad():
            expected = problem.tasks[task](merged, params, batch).logits
            actual = model(**{k: batch[k] for k in SequenceClassificationTask.INPUTS if k in batch}).logits
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)

        rows = read_rows(named_zoo, task)
        classify = pipeline("text-classification", model=str(folder))
        inputs = [{"text": r["text"], "text_pair": r["text_pair"]} if "text_pair" in r else r["text"] for r in rows]
        predicted = [model.config.label2id[p["label"]] for p in classify(inputs)]
        accuracy = sum(p == r["label"] for p, r in zip(predicted, rows)) / len(rows)
        assert accuracy == pytest.approx(evaluation[task]["accuracy"])


# ---------------------------------------------------------------------- model card


def test_the_model_card_parses_with_huggingface_hub(fitted):
    from huggingface_hub import ModelCard

    recipe, result = fitted
    card = ModelCard.load(result.run_dir / "merged" / "README.md")
    assert card.data.base_model is None  # the base is a local folder with no hub id: no path in base_model
    assert {"merge", "adamerge"} <= set(card.data.tags) and card.data.library_name == "transformers"
    evaluation = json.loads((result.run_dir / "eval.json").read_text())
    parsed = {r.dataset_name: r.metric_value for r in card.data.eval_results}
    assert parsed == {task: evaluation[task]["accuracy"] for task in LABEL_NAMES}
    means = result.merged.coefficients().detach().mean(dim=1)
    for name, mean in zip(("a", "b"), means.tolist()):
        assert f"| {name} | {mean:.4f} |" in card.text
    assert "layer-wise coefficients learned with ['entropy']" in card.text


def test_the_model_card_names_the_base_by_hub_id_only(fitted, zoo, tmp_path):
    from types import SimpleNamespace

    from huggingface_hub import ModelCard

    from adamerge.app.export import model_card

    recipe, result = fitted
    hub_named = tmp_path / "hub_named"
    shutil.copytree(zoo / "base", hub_named)
    config = json.loads((hub_named / "config.json").read_text())
    (hub_named / "config.json").write_text(json.dumps({**config, "_name_or_path": "org/tiny-bert"}))
    local_named = tmp_path / "local_named"
    shutil.copytree(zoo / "base", local_named)
    (local_named / "config.json").write_text(json.dumps({**config, "_name_or_path": str(hub_named)}))
    for base, expected in ((hub_named, "org/tiny-bert"), ("org/on-the-hub", "org/on-the-hub"),
                           (local_named, None), (zoo / "base", None)):
        problem = SimpleNamespace(description={"kind": "hf_sequence_classification", "base": str(base),
                                               "experts": {"a": str(hub_named)}})
        card = ModelCard(model_card(recipe, problem, "a test", result.results))
        assert card.data.base_model == expected, base
        assert f"`{expected or base}`" in card.text


# ---------------------------------------------------------------------- mergekit for data-free merges


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
def test_data_free_merges_write_the_mergekit_equivalent(zoo, named_zoo, tmp_path, case):
    from omegaconf import OmegaConf

    from adamerge.io.checkpoints import open_weights

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
def test_merges_without_a_mergekit_equivalent_say_why(zoo, named_zoo, tmp_path, method, args, reason):
    result = runner.merge(zoo_recipe(zoo, named_zoo, tmp_path, method, method={"name": method, "args": args}))
    assert not (result.run_dir / "mergekit.yaml").exists()
    assert reason in (result.run_dir / "mergekit.txt").read_text()


def test_mergekit_skips_a_bare_encoder_base_saying_why(zoo, named_zoo):
    from dataclasses import replace

    from adamerge.app.export import method_mergekit_config

    problem = build_problem(zoo_recipe(zoo, named_zoo, "unused", "x").problem)
    bare = replace(problem, description={**problem.description, "base": str(zoo / "encoder_only")})
    config, reason = method_mergekit_config("task_arithmetic", {}, bare, {"include": problem.include, "exclude": None})
    assert config is None and "bare encoder" in reason
    config, note = method_mergekit_config("task_arithmetic", {}, problem, {"include": problem.include, "exclude": None})
    assert config is not None and "classifier.weight" in note


# ---------------------------------------------------------------------- data-free merges without data


def test_a_data_free_merge_runs_with_experts_only(zoo, named_zoo, tmp_path, capsys):
    from transformers import AutoModel

    from adamerge.io.checkpoints import open_weights

    experts_only = {t: {"expert": str(named_zoo / "zoo" / t)} for t in ("a", "b")}
    recipe = {"name": "bare", "output_dir": f"{tmp_path}/bare", "method": {"name": "task_arithmetic", "args": {"scaling": 0.4}},
              "problem": {"kind": "hf_sequence_classification", "pretrained": str(zoo / "base"), "tasks": experts_only}}
    result = runner.merge(load_recipe(recipe))
    assert "no task has evaluation data: the merge is exported without evaluation" in capsys.readouterr().out
    assert result.results == {} and not (result.run_dir / "eval.json").exists()
    assert (result.run_dir / "mergekit.yaml").is_file() and (result.run_dir / "merged" / "tasks" / "b").is_dir()
    base = open_weights(str(zoo / "base"))
    experts = [open_weights(str(named_zoo / "zoo" / t)) for t in ("a", "b")]
    state = AutoModel.from_pretrained(str(result.run_dir / "merged")).state_dict()
    key = "bert.encoder.layer.1.output.dense.weight"
    expected = base[key] + 0.4 * sum(e[key] - base[key] for e in experts)
    torch.testing.assert_close(state[key.removeprefix("bert.")], expected, rtol=1e-6, atol=1e-6)

    learning = {**recipe, "method": None, "output_dir": f"{tmp_path}/learn"}
    with pytest.raises(ValueError, match=r"task\(s\) \['a', 'b'\] have no calibration data"):
        runner.fit(load_recipe(learning))
