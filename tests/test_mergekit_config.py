"""Reading a mergekit YAML: every setting resolved per tensor of the base checkpoint as mergekit 0.1.5
resolves it (a model's own settings before the top-level ones, the first matching filter, gradients
over the layer position), checked by hand on a checkpoint of a few named tensors."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import save_file

from adamerge.app.mergekit.config import read_mergekit

LAYERS = 3  # mergekit's t: 0, 0.5, 1 in layers 0, 1, 2; 0 outside the layers


@pytest.fixture
def base(tmp_path):
    """A checkpoint with tensors outside the layers, three numbered layers, and a non-float buffer."""
    tensors = {"embed.weight": torch.zeros(4, 2), "head.weight": torch.zeros(3, 2), "position_ids": torch.arange(4)}
    for i in range(LAYERS):
        tensors[f"layers.{i}.mlp.w"] = torch.zeros(2, 2)
        tensors[f"layers.{i}.attn.w"] = torch.zeros(2)
    save_file(tensors, tmp_path / "base.safetensors")
    return str(tmp_path / "base.safetensors")


def read(tmp_path, config):
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    return read_mergekit(path)


def per_tensor(merge, row):
    return {key: pytest.approx(float(value)) for key, value in zip(merge.shapes, row)}


def test_settings_resolve_per_tensor_as_mergekit_does(tmp_path, base):
    merge = read(tmp_path, {
        "merge_method": "ties", "base_model": base,
        "parameters": {"density": [{"filter": "attn", "value": 0.4}, {"value": 0.9}], "lambda": 0.5, "weight": 2.0},
        "models": [
            {"model": base, "parameters": {"weight": 7.0}},  # the base itself: not an expert
            {"model": "m/a", "parameters": {"weight": [0.0, 1.0], "density": 0.3}},
            {"model": "m/b", "parameters": {"weight": [{"filter": "layers.1", "value": 5.0}, {"filter": "mlp", "value": 4.0}]}},
        ],
    })
    assert merge.base == base and merge.experts == {"a": "m/a", "b": "m/b"}
    assert "position_ids" not in merge.shapes  # mergekit merges floating-point tensors only
    assert per_tensor(merge, merge.terms.values[0]) == {  # a gradient over t, t = 0 outside the layers
        "embed.weight": 0.0, "head.weight": 0.0, "layers.0.mlp.w": 0.0, "layers.0.attn.w": 0.0,
        "layers.1.mlp.w": 0.5, "layers.1.attn.w": 0.5, "layers.2.mlp.w": 1.0, "layers.2.attn.w": 1.0}
    assert per_tensor(merge, merge.terms.values[1]) == {  # the first matching filter, else the top-level weight
        "embed.weight": 2.0, "head.weight": 2.0, "layers.0.mlp.w": 4.0, "layers.0.attn.w": 2.0,
        "layers.1.mlp.w": 5.0, "layers.1.attn.w": 5.0, "layers.2.mlp.w": 4.0, "layers.2.attn.w": 2.0}
    assert per_tensor(merge, merge.terms.density[0]) == dict.fromkeys(merge.shapes, 0.3)  # its own over the top-level one
    assert per_tensor(merge, merge.terms.density[1]) == {
        key: 0.4 if "attn" in key else 0.9 for key in merge.shapes}
    assert merge.terms.parameters == {"normalize": True, "rescale": False, "lambda": 0.5, "int8_mask": False}
    assert merge.terms.numels["embed.weight"] == 8


def test_linear_weights_become_coefficients_from_the_first_model_without_a_base(tmp_path, base):
    merge = read(tmp_path, {"merge_method": "linear", "models": [
        {"model": base, "parameters": {"weight": 1.0}},
        {"model": "m/a", "parameters": {"weight": [{"filter": "head", "value": 3.0}, {"value": 1.0}]}},
    ]})
    assert merge.base == base and list(merge.experts) == ["a"]
    assert per_tensor(merge, merge.terms.values[0]) == {key: 0.75 if key == "head.weight" else 0.5 for key in merge.shapes}


def test_task_arithmetic_scales_by_lambda_and_normalizes_when_asked(tmp_path, base):
    models = [{"model": "m/a", "parameters": {"weight": 1.0}}, {"model": "m/b", "parameters": {"weight": 3.0}}]
    merge = read(tmp_path, {"merge_method": "task_arithmetic", "base_model": base, "models": models,
                            "parameters": {"lambda": 2.0, "normalize": True}})
    assert merge.terms.values[:, 0].tolist() == pytest.approx([0.5, 1.5])
    assert merge.initial() is merge.terms.values


@pytest.mark.parametrize("change, message", [
    ({"parameters": {"lambda": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}}, "parameters.lambda varies over tensors"),
    ({"models": [{"model": "m/a"}]}, r"models\[0\].parameters: no `weight` for tensor embed.weight"),
    ({"models": [{"model": "m/a", "parameters": {"weight": "high"}}]}, r"models\[0\].parameters.weight: 'high' is not a number"),
    ({"models": [{"model": "m/a", "parameters": {"weight": 1, "epsilon": 0.1}}]}, r"models\[0\].parameters.epsilon"),
    ({"base_model": None}, "base_model: mergekit's task_arithmetic needs one"),
    ({"dtype": "int8"}, "dtype 'int8'"),
])
def test_settings_without_an_adamerge_reading_are_refused_naming_the_key(tmp_path, base, change, message):
    config = {"merge_method": "task_arithmetic", "base_model": base, "models": [{"model": "m/a", "parameters": {"weight": 1.0}}]}
    config.update(change)
    with pytest.raises(ValueError, match=message):
        read(tmp_path, config)


def test_a_gradient_needs_one_stack_of_layers(tmp_path):
    save_file({"encoder.layers.0.w": torch.zeros(2), "decoder.layers.0.w": torch.zeros(2)}, tmp_path / "base.safetensors")
    with pytest.raises(ValueError, match="a gradient needs one stack of numbered layers"):
        read(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base.safetensors"),
                        "models": [{"model": "m/a", "parameters": {"weight": [0.1, 0.9]}}]})
