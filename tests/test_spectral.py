"""Spectral coefficients, checked by hand on small matrices: the factors rebuild each expert's τ; at
the initial values the merge is task arithmetic bit for bit (every rank, any constraint); a zeroed
coefficient removes exactly its expert's σ u vᵀ (or the rest τ_k − its top-r part); the gradient of
a coefficient is <∂L/∂θ, σ u vᵀ>; coefficients save, load and transfer; a tiny fit runs end to end."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.func import functional_call

from adamerge import MergeCoefficients, build_layout
from adamerge.core.merged import MergedModel
from adamerge.core.spectral import decompose
from adamerge.core.task_vectors import TaskVectors

EXPERTS = ["a", "b", "c"]


def tiny(dtype=torch.float32):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).to(dtype)
    vectors = {name: 0.1 * torch.randn(len(EXPERTS), *p.shape, dtype=dtype) for name, p in net.named_parameters()}
    return net, TaskVectors(vectors, EXPERTS)


def components(tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An independent float64 SVD of one expert's matrix."""
    return torch.linalg.svd(tau.double(), full_matrices=False)


def set_value(merged: MergedModel, expert: int, slot: int, value: float) -> None:
    """Set one effective coefficient (unconstrained coefficients: raw = effective)."""
    column = merged.layout.trainable_slots.index(slot)
    with torch.no_grad():
        merged.coefficients.raw[expert, column] = value


def test_the_factors_rebuild_every_experts_matrix_and_name_owner_and_slot():
    tau = torch.randn(2, 5, 3)
    left, right, owner, slot = decompose(tau, [7, 8, 9], "cpu")
    assert left.shape == (5, 6) and right.shape == (6, 3)
    assert owner.tolist() == [0, 0, 0, 1, 1, 1] and slot.tolist() == [7, 8, 9, 7, 8, 9]
    for k in range(2):
        torch.testing.assert_close(left[:, owner == k] @ right[owner == k], tau[k], atol=1e-5, rtol=0)
    u, s, vh = components(tau[1])
    torch.testing.assert_close(left[:, 3].double().norm(), s[0])  # U diag(σ): the top singular value first


@pytest.mark.parametrize("rank", [None, 1, 2, 3])
@pytest.mark.parametrize("constraint", [None, {"name": "mask", "hi": 0.3}])
def test_at_the_initial_values_the_merge_is_task_arithmetic_bit_for_bit(rank, constraint):
    net, tv = tiny()
    spectral = MergedModel(net, tv, "spectral", init=0.3, constraint=constraint, rank=rank).merged_parameters()
    task_arithmetic = MergedModel(net, tv, "task", init=0.3).merged_parameters()
    assert all(torch.equal(spectral[k], task_arithmetic[k]) for k in task_arithmetic)
    base = dict(net.named_parameters())
    for key in task_arithmetic:
        torch.testing.assert_close(spectral[key], base[key] + 0.3 * tv[key].sum(0))


def test_a_bf16_model_is_rounded_once_as_task_arithmetic_is():
    net, tv = tiny(torch.bfloat16)
    spectral = MergedModel(net, tv, "spectral", init=0.3).merged_parameters()
    layer = MergedModel(net, tv, "layer", init=0.3).merged_parameters()
    assert all(spectral[k].dtype == torch.bfloat16 and torch.equal(spectral[k], layer[k]) for k in layer)


def test_zeroing_a_component_removes_exactly_that_experts_sigma_u_v():
    net, tv = tiny()
    merged = MergedModel(net, tv, "spectral", init=0.3)
    before = {k: v.clone() for k, v in merged.merged_parameters().items()}
    slots = merged.layout.tensor_slots["0.weight"]
    assert len(slots) == 5  # min(5, 6): every component of the [5, 6] matrix
    set_value(merged, expert=1, slot=slots[2], value=0.0)
    after = merged.merged_parameters()
    u, s, vh = components(tv["0.weight"][1])
    removed = s[2] * torch.outer(u[:, 2], vh[2])
    torch.testing.assert_close(after["0.weight"].double(), before["0.weight"].double() - 0.3 * removed, atol=1e-6, rtol=0)
    assert all(torch.equal(after[k], before[k]) for k in before if k != "0.weight")


def test_with_a_rank_the_rest_slot_scales_what_the_top_components_leave():
    net, tv = tiny()
    merged = MergedModel(net, tv, "spectral", init=0.3, rank=2)
    slots = merged.layout.tensor_slots["0.weight"]
    assert [merged.layout.slot_names[s] for s in slots] == ["0.weight[sv0]", "0.weight[sv1]", "0.weight[rest]"]
    before = merged.merged_parameters()["0.weight"].clone()
    set_value(merged, expert=0, slot=slots[-1], value=1.3)  # the rest of expert a: 0.3 → 1.3
    set_value(merged, expert=2, slot=slots[0], value=-0.7)  # the top component of expert c: 0.3 → -0.7
    u, s, vh = components(tv["0.weight"][0])
    rest = tv["0.weight"][0].double() - (u[:, :2] * s[:2]) @ vh[:2]
    u, s, vh = components(tv["0.weight"][2])
    top = s[0] * torch.outer(u[:, 0], vh[0])
    expected = before.double() + 1.0 * rest - 1.0 * top
    torch.testing.assert_close(merged.merged_parameters()["0.weight"].double(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rank", [None, 2])
def test_the_gradient_of_a_coefficient_is_the_loss_gradient_against_its_component(rank):
    net, tv = tiny()
    merged = MergedModel(net, tv, "spectral", init=0.3, rank=rank)
    x = torch.randn(8, 6)
    merged(x).pow(2).sum().backward()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in merged.merged_parameters().items()}
    functional_call(net, params, (x,)).pow(2).sum().backward()
    grad = params["0.weight"].grad.double()  # ∂L/∂θ, independently of the coefficients
    slots = merged.layout.tensor_slots["0.weight"]
    for k in range(len(EXPERTS)):
        u, s, vh = components(tv["0.weight"][k])
        for j in range(2):
            expected = (grad * s[j] * torch.outer(u[:, j], vh[j])).sum()
            column = merged.layout.trainable_slots.index(slots[j])
            torch.testing.assert_close(merged.coefficients.raw.grad[k, column].double(), expected, atol=1e-5, rtol=1e-4)
        if rank is not None:
            rest = tv["0.weight"][k].double() - (u[:, :2] * s[:2]) @ vh[:2]
            column = merged.layout.trainable_slots.index(slots[-1])
            torch.testing.assert_close(merged.coefficients.raw.grad[k, column].double(), (grad * rest).sum(), atol=1e-5, rtol=1e-4)


def test_coefficients_save_load_and_restore_the_same_merge(tmp_path):
    net, tv = tiny()
    constraint = {"name": "mask", "lo": 0.0, "hi": 0.3, "temperature": 4.0}
    merged = MergedModel(net, tv, "spectral", init=0.3, constraint=constraint, rank=2)
    with torch.no_grad():
        merged.coefficients.raw.copy_(torch.randn_like(merged.coefficients.raw))
    merged.coefficients.save(tmp_path / "c.safetensors")
    loaded = MergeCoefficients.load(tmp_path / "c.safetensors")
    assert loaded.layout == merged.layout and loaded.constraint.describe() == merged.coefficients.constraint.describe()
    assert torch.equal(loaded(), merged.coefficients())
    fresh = MergedModel(net, tv, "spectral", init=0.3, constraint=constraint, rank=2)
    fresh.load_coefficients(str(tmp_path / "c.safetensors"))
    expected = merged.merged_parameters()
    assert all(torch.equal(fresh.merged_parameters()[k], expected[k]) for k in expected)


def test_transfer_spreads_a_tensors_value_over_its_components_and_keeps_a_spectral_layout():
    net, tv = tiny()
    shapes = {k: tuple(tv.shape(k)[1:]) for k in tv.keys}
    layer = MergeCoefficients(build_layout(EXPERTS, shapes, "layer"), init=torch.arange(12.0).view(3, 4) / 10)
    spectral = MergeCoefficients(build_layout(EXPERTS, shapes, "spectral", rank=2), init=layer)
    for key, slots in spectral.layout.tensor_slots.items():
        expected = layer()[:, layer.layout.tensor_slots[key][0]]
        assert all(torch.allclose(spectral()[:, s], expected) for s in slots)
    assert torch.equal(MergeCoefficients(spectral.layout, init=spectral)(), spectral())
    with pytest.raises(ValueError, match=r"spectral coefficients scale singular components, not rows: '0.weight'"):
        MergeCoefficients(layer.layout, init=spectral)


def test_a_tiny_adarank_fit_runs_through_the_command_line_and_reevaluates(zoo, recipe_dict, tmp_path):
    from omegaconf import OmegaConf

    from adamerge.app import cli, runner

    recipe = recipe_dict(zoo, tmp_path / "runs", name="adarank", export={"plot": False},
                         coefficients={"granularity": "spectral", "rank": 4, "init": 0.3,
                                       "constraint": {"name": "mask", "hi": 0.3}, "freeze": ["LayerNorm", "\\.bias$"]},
                         objectives=[{"name": "entropy"}], optimizer={"lr": 0.05})
    path = tmp_path / "adarank.yaml"
    OmegaConf.save(OmegaConf.create(recipe), path)
    assert cli.main(["fit", str(path), "trainer.max_steps=3"]) == 0
    run = tmp_path / "runs" / "adarank"
    coefficients = MergeCoefficients.load(run / "coefficients.safetensors")
    layout = coefficients.layout
    assert layout.granularity == "spectral" and coefficients.constraint.name == "mask"
    query = "bert.encoder.layer.0.attention.self.query.weight"  # [16, 16]: 4 components and the rest
    assert [layout.slot_names[s].rsplit("[", 1)[1] for s in layout.tensor_slots[query]] == ["sv0]", "sv1]", "sv2]", "sv3]", "rest]"]
    values = coefficients()
    assert bool(((values == 0.0) | (values == 0.3)).all())  # every mask is on or off
    assert bool((coefficients.raw.detach().abs() != 0.1).any())  # and the logits moved
    results = json.loads((run / "eval.json").read_text())
    assert results and runner.evaluate_run(run) == results  # the saved layout rebuilds the same merge
