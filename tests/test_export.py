"""What a run exports, opened with the other tools' own loaders: per-task Hugging Face classifiers
(``from_pretrained``, ``pipeline``) and the model card (``huggingface_hub``); mergekit's in test_mergekit.py."""

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
