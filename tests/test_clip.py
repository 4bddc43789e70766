"""The ``hf_clip`` kind (adamerge.app.problems.clip): image tables and zero-shot heads from the
pretrained text tower, and its exporter through the files it writes: a complete ``CLIPModel`` (the
merged vision tower and projection over the pretrained text tower) with the processor."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from adamerge import MergedModel, TaskVectors  # noqa: E402
from adamerge.app.config import load_recipe  # noqa: E402
from adamerge.app.problems import build_problem  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_the_kind_loads_an_image_table_and_zero_shot_heads(images, clip_zoo, tmp_path):
    import datasets

    features = datasets.Features({"picture": datasets.Image(), "y": datasets.Value("int64")})
    for name, n in (("train", 5), ("test", 3)):
        table = datasets.Dataset.from_dict({"picture": images(n, seed=n), "y": [i % 2 for i in range(n)]}, features=features)
        table.to_parquet(str(tmp_path / f"{name}.parquet"))
    recipe = load_recipe({
        "problem": {
            "kind": "hf_clip",
            "pretrained": str(clip_zoo / "base"),
            "tasks": {
                "shapes": {
                    "expert": str(clip_zoo / "e0"), "classnames": ["circle", "square"], "image": "picture",
                    "label": "y", "calibration": {"path": str(tmp_path / "train.parquet")},
                    "evaluation": {"path": str(tmp_path), "split": "test"},
                },
                "colors": {
                    "expert": str(clip_zoo / "e1"), "classnames": ["red", "green", "blue"], "templates": ["{}"],
                    "image": "picture", "label": "y", "calibration": {"path": str(tmp_path / "train.parquet"), "max_samples": 2},
                },
            },
        }
    })
    problem = build_problem(recipe.problem)
    assert sorted(problem.tasks) == ["colors", "shapes"] and problem.experts == {"shapes": str(clip_zoo / "e0"), "colors": str(clip_zoo / "e1")}
    assert len(problem.calibration["shapes"]) == 5 and len(problem.calibration["colors"]) == 2
    assert len(problem.evaluation["shapes"]) == 3 and "colors" not in problem.evaluation
    assert problem.tasks["colors"].class_embeddings.shape == (3, 8)
    batch = problem.collate([problem.calibration["shapes"][i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 16, 16) and batch["labels"].tolist() == [0, 1, 0]
    tv = TaskVectors.from_models(problem.pretrained, problem.experts, include=problem.include)
    merged = MergedModel(problem.pretrained, tv, "task")
    assert all(k.startswith(("vision_model.", "visual_projection.")) for k in merged.keys)
    output = problem.tasks["shapes"](merged, merged.merged_parameters(), batch)
    assert output.logits.shape == (3, 2) and torch.isfinite(output.logits).all()
    with pytest.raises(ValueError, match="'nameless'.*classnames"):
        bad = load_recipe({"problem": {"kind": "hf_clip", "pretrained": str(clip_zoo / "base"),
                                       "tasks": {"nameless": {"expert": str(clip_zoo / "e0")}}}})
        build_problem(bad.problem)


def test_the_export_is_the_pretrained_clip_with_the_merged_vision_tower(clip_zoo, tmp_path):
    from transformers import AutoProcessor, CLIPModel

    recipe = load_recipe({"problem": {"kind": "hf_clip", "pretrained": str(clip_zoo / "base"),
                                      "tasks": {"shapes": {"expert": str(clip_zoo / "e0"), "classnames": ["a", "b"]}}}})
    problem = build_problem(recipe.problem)
    merged = problem.pretrained
    with torch.no_grad():
        merged.visual_projection.weight.add_(0.5)
    problem.exporter.export(merged, tmp_path / "merged", 10**9)
    written, base = CLIPModel.from_pretrained(tmp_path / "merged"), CLIPModel.from_pretrained(clip_zoo / "base")
    assert torch.equal(written.visual_projection.weight, merged.visual_projection.weight)
    assert all(torch.equal(written.vision_model.state_dict()[k], v) for k, v in merged.vision_model.state_dict().items())
    assert all(torch.equal(written.text_model.state_dict()[k], v) for k, v in base.text_model.state_dict().items())
    assert torch.equal(written.logit_scale, base.logit_scale)
    assert type(AutoProcessor.from_pretrained(tmp_path / "merged")).__name__ == "CLIPProcessor"

    class Stray(torch.nn.Module):  # a merged tensor the CLIPModel does not have
        def __init__(self):
            super().__init__()
            self.extra = torch.nn.Linear(2, 2)

    with pytest.raises(KeyError, match="merged tensor 'extra.weight' is not in the CLIPModel"):
        problem.exporter.export(Stray(), tmp_path / "stray", 10**9)
