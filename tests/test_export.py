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

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def fitted(zoo, named_zoo, zoo_recipe, tmp_path_factory):
    recipe = zoo_recipe(zoo, named_zoo, tmp_path_factory.mktemp("runs"), "ada")
    return recipe, runner.fit(recipe)


def read_rows(named_zoo, task):
    return [json.loads(line) for line in (named_zoo / "data" / task / "test.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------- per-task Hugging Face folders


def test_each_task_exports_a_classifier_transformers_opens_with_the_merged_logits(label_names, fitted, named_zoo):
    from transformers import AutoModelForSequenceClassification, pipeline

    recipe, result = fitted
    problem = build_problem(recipe.problem)
    merged = result.merged.eval()
    params = merged.merged_parameters()
    evaluation = json.loads((result.run_dir / "eval.json").read_text())
    for task, names in label_names.items():
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


def test_the_model_card_parses_with_huggingface_hub(label_names, fitted):
    from huggingface_hub import ModelCard

    recipe, result = fitted
    card = ModelCard.load(result.run_dir / "merged" / "README.md")
    assert card.data.base_model is None  # the base is a local folder with no hub id: no path in base_model
    assert {"merge", "adamerge"} <= set(card.data.tags) and card.data.library_name == "transformers"
    evaluation = json.loads((result.run_dir / "eval.json").read_text())
    parsed = {r.dataset_name: r.metric_value for r in card.data.eval_results}
    assert parsed == {task: evaluation[task]["accuracy"] for task in label_names}
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


# ---------------------------------------------------------------------- hf_clip: a complete CLIPModel

CLIP_TASKS = {"shapes": (["circle", "square"], ["{}"]), "colors": (["red", "green", "blue"], ["a photo of {}.", "a {}"])}


@pytest.fixture(scope="module")
def clip_fitted(clip_zoo, images, tmp_path_factory):
    """A fit on the tiny CLIP zoo whose base's config.json names a hub id (as a downloaded model's does)."""
    import datasets

    root = tmp_path_factory.mktemp("clip_run")
    base = root / "base"
    shutil.copytree(clip_zoo / "base", base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "_name_or_path": "org/tiny-clip"}))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    for split, n in (("train", 6), ("test", 10)):
        table = {"image": images(n, seed=n), "label": [i % 2 for i in range(n)]}
        datasets.Dataset.from_dict(table, features=features).to_parquet(str(root / f"{split}.parquet"))
    tasks = {
        name: {"expert": str(clip_zoo / f"e{k}"), "classnames": classes, "templates": templates,
               "calibration": {"path": str(root / "train.parquet")}, "evaluation": {"path": str(root / "test.parquet")}}
        for k, (name, (classes, templates)) in enumerate(CLIP_TASKS.items())
    }
    recipe = load_recipe({
        "name": "clip", "output_dir": str(root / "runs" / "clip"),
        "problem": {"kind": "hf_clip", "pretrained": str(base), "tasks": tasks},
        "coefficients": {"granularity": "layer", "init": 0.3}, "optimizer": {"lr": 0.05},
        "trainer": {"max_steps": 2, "batch_size": 4, "progress_bar": False, "accelerator": "cpu"},
        "export": {"plot": False, "mergekit": False},
    })
    return recipe, runner.fit(recipe)


def pooled(features):
    """The projected features, whether transformers returns them bare or as an output's pooler_output."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def test_hf_clip_exports_a_complete_clip_model_with_the_evaluated_zero_shot_logits(clip_fitted):
    import torch.nn.functional as F
    from transformers import CLIPModel, CLIPProcessor

    recipe, result = clip_fitted
    folder = result.run_dir / "merged"
    model, info = CLIPModel.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    pretrained = CLIPModel.from_pretrained(recipe.problem.pretrained).state_dict()
    exported = model.state_dict()
    for key in pretrained:  # the text tower and logit scale are the pretrained model's, bit for bit
        if not key.startswith(("vision_model.", "visual_projection.")):
            assert torch.equal(exported[key], pretrained[key]), key
    merged_vision = result.merged.to_module().state_dict()
    assert torch.equal(exported["visual_projection.weight"], merged_vision["visual_projection.weight"])
    assert not torch.equal(exported["visual_projection.weight"], pretrained["visual_projection.weight"])

    problem = build_problem(recipe.problem)
    processor = CLIPProcessor.from_pretrained(str(folder))
    params = result.merged.merged_parameters()
    for task, (classes, templates) in CLIP_TASKS.items():
        rows = [problem.evaluation[task][i] for i in range(len(problem.evaluation[task]))]
        batch = problem.collate(rows)
        with torch.no_grad():
            expected = problem.tasks[task](result.merged, params, batch).logits
            image = F.normalize(pooled(model.get_image_features(pixel_values=batch["pixel_values"])), dim=-1)
            text = torch.stack([  # the standard zero-shot head, computed here from the exported model alone
                F.normalize(F.normalize(pooled(model.get_text_features(**processor.tokenizer(
                    [t.format(c) for t in templates], padding=True, return_tensors="pt"))), dim=-1).mean(0), dim=-1)
                for c in classes])
            actual = model.logit_scale.exp() * image @ text.T
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_the_zero_shot_pipeline_on_the_clip_export_reproduces_eval_json(images, clip_fitted):
    from transformers import pipeline

    recipe, result = clip_fitted
    classes, _ = CLIP_TASKS["shapes"]  # its template is "{}": one prompt per class, as the pipeline writes it
    evaluation = json.loads((result.run_dir / "eval.json").read_text())
    classify = pipeline("zero-shot-image-classification", model=str(result.run_dir / "merged"))
    pictures, labels = images(10, seed=10), [i % 2 for i in range(10)]
    answers = classify(pictures, candidate_labels=classes, hypothesis_template="{}")
    scores = torch.tensor([[next(a["score"] for a in answer if a["label"] == c) for c in classes] for answer in answers])
    problem = build_problem(recipe.problem)
    batch = problem.collate([{"image": picture, "label": y} for picture, y in zip(pictures, labels)])
    with torch.no_grad():
        evaluated = problem.tasks["shapes"](result.merged, result.merged.merged_parameters(), batch).logits
    torch.testing.assert_close(scores, evaluated.softmax(-1), rtol=1e-5, atol=1e-6)  # image by image
    predicted = scores.argmax(-1).tolist()
    accuracy = sum(p == y for p, y in zip(predicted, labels)) / len(labels)
    assert accuracy == pytest.approx(evaluation["shapes"]["accuracy"])


def test_the_clip_model_card_names_the_hub_base_and_the_zero_shot_pipeline(clip_fitted):
    from huggingface_hub import ModelCard

    recipe, result = clip_fitted
    card = ModelCard.load(result.run_dir / "merged" / "README.md")
    assert card.data.base_model == "org/tiny-clip"
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "zero-shot-image-classification"
    assert {"merge", "adamerge"} <= set(card.data.tags)
    evaluation = json.loads((result.run_dir / "eval.json").read_text())
    assert {r.dataset_name: r.metric_value for r in card.data.eval_results} == {t: evaluation[t]["accuracy"] for t in CLIP_TASKS}
    assert {r.task_type for r in card.data.eval_results} == {"zero-shot-image-classification"}
    for name, mean in zip(CLIP_TASKS, result.merged.coefficients().detach().mean(dim=1).tolist()):
        assert f"| {name} | {mean:.4f} |" in card.text
    assert "text tower, logit scale and processor are the pretrained model's" in card.text
    assert "layer-wise coefficients learned" in card.text


# ---------------------------------------------------------------------- plain modules: sharded safetensors


class TiedNet(torch.nn.Module):
    """An output layer tied to the token embedding; the alias ``out.weight`` sorts before its canonical
    name ``tok.weight``, so keeping the canonical name is a choice, not the alphabetical default."""

    def __init__(self):
        super().__init__()
        self.tok = torch.nn.Embedding(32, 8)
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
        self.out = torch.nn.Linear(8, 32, bias=False)
        self.out.weight = self.tok.weight


def tied_problem(config):
    """A dotted-path builder (``test_export:tied_problem``): a tied plain module and two experts."""
    from fixtures.families import perturbed

    from adamerge.app.problems.problem import MergeProblem

    torch.manual_seed(config.seed)
    pretrained = TiedNet()
    experts = {f"e{k}": perturbed(pretrained, seed=10 + k) for k in range(2)}
    return MergeProblem(pretrained=pretrained, experts=experts, tasks={}, calibration={},
                        description={"kind": "tied", "base": "nowhere", "experts": {k: k for k in experts}})


def test_a_plain_merge_is_written_as_safetensors_shards_with_an_index(tmp_path):
    from huggingface_hub import ModelCard, load_torch_model
    from safetensors import safe_open

    from adamerge.io.checkpoints import open_weights

    recipe = load_recipe({"name": "tied", "output_dir": str(tmp_path / "tied"), "problem": {"kind": "test_export:tied_problem"},
                          "method": {"name": "task_arithmetic", "args": {"scaling": 0.4}},
                          "export": {"plot": False, "mergekit": False, "max_shard_size": "0.4KB"}})
    folder = runner.merge(recipe).run_dir / "merged"
    problem = tied_problem(recipe.problem)
    base, experts = problem.pretrained.state_dict(), [e.state_dict() for e in problem.experts.values()]
    expected = {key: base[key] + 0.4 * sum(e[key] - base[key] for e in experts) for key in base}

    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) >= 3 and shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["metadata"]["out.weight"] == "tok.weight"  # the alias, stored once under the canonical name
    union = {}
    for shard in shards:
        with safe_open(str(folder / shard), framework="pt") as handle:
            assert not set(handle.keys()) & set(union)
            union.update({key: handle.get_tensor(key) for key in handle.keys()})
            assert all(index["weight_map"][key] == shard for key in handle.keys())
    assert sorted(union) == sorted(set(expected) - {"out.weight"})
    for key, tensor in union.items():
        torch.testing.assert_close(tensor, expected[key], rtol=0, atol=1e-6)
    read = open_weights(str(folder))
    assert sorted(read) == sorted(union) and all(torch.equal(read[key], union[key]) for key in union)
    fresh = TiedNet()
    assert load_torch_model(fresh, folder, strict=False).missing_keys == ["out.weight"]
    torch.testing.assert_close(fresh.out.weight.detach(), expected["out.weight"], rtol=0, atol=1e-6)

    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model is None and card.data.library_name is None and card.data.pipeline_tag is None
    assert {"merge", "adamerge", "pytorch", "safetensors"} <= set(card.data.tags)
    assert "data-free `task_arithmetic` {'scaling': 0.4}" in card.text and "load_torch_model" in card.text


def test_a_plain_module_that_fits_one_shard_is_one_file_safetensors_reloads(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_model

    from adamerge.app.problems.problem import Exporter

    torch.manual_seed(1)
    module = TiedNet()
    Exporter().export(module, tmp_path, 5 * 10**9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "out.weight": "tok.weight"} and "out.weight" not in handle.keys()
    fresh = TiedNet()
    load_model(fresh, tmp_path / "model.safetensors")  # safetensors' own loader, strict, ties understood
    for key, tensor in module.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], tensor), key
    assert fresh.out.weight is fresh.tok.weight


def test_max_shard_size_is_checked_when_the_recipe_loads():
    from adamerge.app.checks import RecipeError
    from adamerge.app.config import shard_size_bytes

    assert [shard_size_bytes(s) for s in ("5GB", "1.5mb", "2 KB", "123", 640)] == [5 * 10**9, 1_500_000, 2000, 123, 640]
    assert load_recipe({"export": {"max_shard_size": "20MB"}}).export.max_shard_size == "20MB"
    for bad in ("5 gigs", "0", "GB", "-1MB"):
        with pytest.raises(RecipeError, match=r"export\.max_shard_size is '.*'; use a size"):
            load_recipe({"export": {"max_shard_size": bad}})
