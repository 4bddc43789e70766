"""Element-wise coefficients: the merge equals θ_0 + Σ_k C_k ⊙ τ_k computed by hand, the
gradient of each coefficient is ∂L/∂θ ⊙ τ_k, constraints and frozen tensors hold, and a saved
file restores the same merge."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adamerge.core.coefficients import MergeCoefficients
from adamerge.core.layouts import build_layout
from adamerge.core.merged import MergedModel
from adamerge.core.task_vectors import TaskVectors


def _merged(mlp, **options):
    tv = TaskVectors.from_models(mlp.pretrained, mlp.experts)
    return MergedModel(mlp.fresh(), tv, granularity="element", **options), tv


def _randomise(merged, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for raw in merged.coefficients.raw.values():
            raw.copy_(torch.rand(raw.shape, generator=generator))


def test_merge_equals_the_elementwise_sum_by_hand(mlp):
    merged, tv = _merged(mlp)
    _randomise(merged)
    params = merged.merged_parameters()
    base = dict(mlp.pretrained.named_parameters())
    for key in tv.keys:
        C = merged.coefficients.effective(key)
        by_hand = base[key] + sum(C[k] * tv[key][k] for k in range(tv.num_experts))
        torch.testing.assert_close(params[key], by_hand)
    explicit = copy.deepcopy(mlp.pretrained)
    explicit.load_state_dict({**explicit.state_dict(), **{k: v.detach() for k, v in params.items()}})
    torch.testing.assert_close(merged(*mlp.args), explicit(*mlp.args))


def test_gradient_of_each_coefficient_is_the_weight_gradient_times_tau(mlp):
    merged, tv = _merged(mlp)
    _randomise(merged, seed=1)
    params = merged.merged_parameters()
    loss = merged.forward_with(params, *mlp.args).pow(2).sum()
    weight_grads = torch.autograd.grad(loss, [params[k] for k in tv.keys], retain_graph=True)
    loss.backward()
    for key, grad in zip(tv.keys, weight_grads):
        raw = merged.coefficients.raw[merged.coefficients._names[key]]
        torch.testing.assert_close(raw.grad, grad.unsqueeze(0) * tv[key])


def test_starts_at_the_per_expert_init_and_frozen_tensors_never_train(mlp):
    merged, tv = _merged(mlp, init=[0.1, 0.2, 0.5], freeze=[r"^4\."])
    for key in tv.keys:
        C = merged.coefficients.effective(key)
        assert torch.equal(C, torch.tensor([0.1, 0.2, 0.5]).view(-1, *[1] * (C.dim() - 1)).expand_as(C))
    assert not merged.coefficients.is_trainable("4.weight") and merged.coefficients.is_trainable("0.weight")
    assert sum(p.numel() for p in merged.coefficients.parameters()) == 3 * sum(tv[k][0].numel() for k in tv.keys if not k.startswith("4."))


def test_clamp_constraint_is_projected_elementwise(mlp):
    merged, _ = _merged(mlp, constraint={"name": "clamp", "lo": 0.0, "hi": 1.0})
    with torch.no_grad():
        for raw in merged.coefficients.raw.values():
            raw.uniform_(-2, 3)
    merged.coefficients.project_()
    assert all(float(r.detach().min()) >= 0.0 and float(r.detach().max()) <= 1.0 for r in merged.coefficients.raw.values())


def test_save_and_load_restore_the_same_merge(mlp, tmp_path):
    merged, tv = _merged(mlp, constraint="sigmoid", init=0.4)
    _randomise(merged, seed=2)
    path = tmp_path / "coefficients.safetensors"
    merged.coefficients.save(path)
    assert (tmp_path / "coefficients.json").exists()
    again, _ = _merged(mlp, constraint="sigmoid", init=0.4)
    again.load_coefficients(str(path))
    for key in tv.keys:
        assert torch.equal(again.merged_parameters()[key], merged.merged_parameters()[key])
    other, _ = _merged(mlp, constraint="sigmoid", init=0.4, freeze=["0\\."])
    with pytest.raises(ValueError, match="different layout"):
        other.load_coefficients(str(path))
    path.write_bytes(path.read_bytes()[:100])  # truncated: named with its role and file
    with pytest.raises(ValueError, match=f"coefficients {path}"):
        again.load_coefficients(str(path))


def test_starts_from_a_layer_wise_run(mlp, tmp_path):
    tv = TaskVectors.from_models(mlp.pretrained, mlp.experts)
    shapes = {k: tuple(tv[k].shape[1:]) for k in tv.keys}
    layer = MergeCoefficients(build_layout(tv.expert_names, shapes, "layer"), init=0.3)
    with torch.no_grad():
        layer.raw.copy_(torch.arange(layer.raw.numel(), dtype=torch.float32).view_as(layer.raw) / 10)
    layer.save(tmp_path / "layer.safetensors")
    merged = MergedModel(mlp.fresh(), tv, granularity="element", init=str(tmp_path / "layer.safetensors"))
    values = layer()
    for key in tv.keys:
        slot = layer.layout.tensor_slots[key][0]
        C = merged.coefficients.effective(key)
        assert torch.allclose(C, values[:, slot].view(-1, *[1] * (C.dim() - 1)).expand_as(C))
    torch.testing.assert_close(merged.coefficients.summary(), values)


def test_coefficients_keep_float32_and_their_values_when_the_model_is_cast(mlp):
    merged, _ = _merged(mlp, freeze=[r"^4\."])
    _randomise(merged, seed=3)
    before = {name: tensor.clone() for name, tensor in merged.coefficients.state_dict().items()}
    assert any((t.to(torch.bfloat16).float() != t).any() for t in before.values())  # not all bf16 numbers
    merged.to(torch.bfloat16)
    assert merged.backbone[0].weight.dtype == torch.bfloat16  # the rest of the model is cast
    after = merged.coefficients.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in after.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, before[name]), name
    merged.coefficients.to("meta", torch.float16)  # "meta" stands in for an accelerator
    assert {(t.device.type, t.dtype) for t in merged.coefficients.state_dict().values()} == {("meta", torch.float32)}


def test_a_bf16_model_gets_the_float32_sum_rounded_once_and_float32_gradients(bf16_sum_case):
    base, taus, c, expected = bf16_sum_case
    model = nn.Linear(4, 3, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.copy_(base)
    merged = MergedModel(model, TaskVectors({"weight": taus}, ["a", "b"]), "element", init=c.tolist())
    weight = merged.merged_parameters()["weight"]
    assert weight.dtype == torch.bfloat16 and torch.equal(weight, expected)
    assert weight[0, 0] == 1.3046875  # c_0 rounded to bf16 first: 1.296875
    grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    weight.backward(grad)
    raw = merged.coefficients.raw[merged.coefficients._names["weight"]]
    assert raw.grad.dtype == torch.float32 and torch.equal(raw.grad, grad.float() * taus.float())  # exact: 8-bit factors
