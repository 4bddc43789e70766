"""Coefficient constraints: a sigmoid's initial values come back exactly and its output stays in its
range, a clamp projects the raw values back after a step, a mask is exactly lo or hi with the
straight-through gradient of its relaxation, bad specs and bounds are named."""

from __future__ import annotations

import re

import pytest
import torch

from adamerge import Clamp, MergeCoefficients, Sigmoid, build_layout
from adamerge.core.constraints import Constraint, Mask, make_constraint

EXPERTS = ("a", "b")
SHAPES = {"emb.weight": (10, 4), "layers.0.w": (6, 4), "layers.0.b": (6,), "layers.1.w": (6, 4), "head.w": (3, 4)}


@pytest.mark.parametrize("value", [0.3, 0.1, 0.7, 1e-3, 0.5, 0.999, 1e-5, 0.123456])
def test_sigmoid_init_is_exact(value):
    layout = build_layout(EXPERTS, SHAPES, "chunk", chunks=2)
    coefficients = MergeCoefficients(layout, init=value, constraint="sigmoid")
    requested = torch.full((2, layout.num_slots), value, dtype=torch.float32)
    assert torch.equal(coefficients(), requested)
    assert coefficients.raw.dtype == torch.float32


@pytest.mark.parametrize("value", [-0.5, 1e-3, 0.3, 1.9])
def test_sigmoid_init_is_exact_on_other_ranges(value):
    layout = build_layout(EXPERTS, SHAPES, "layer")
    coefficients = MergeCoefficients(layout, init=value, constraint={"name": "sigmoid", "lo": -1.0, "hi": 2.0})
    assert torch.equal(coefficients(), torch.full((2, 5), value))


def test_sigmoid_init_exact_for_mixed_per_expert_values_and_grads_flow():
    layout = build_layout(EXPERTS, SHAPES, "layer")
    coefficients = MergeCoefficients(layout, init={"a": 1e-3, "b": 0.7}, constraint="sigmoid")
    assert torch.equal(coefficients()[0], torch.full((5,), 1e-3))
    assert torch.equal(coefficients()[1], torch.full((5,), 0.7))
    coefficients().sum().backward()
    p = torch.tensor([1e-3, 0.7]).unsqueeze(1)
    torch.testing.assert_close(coefficients.raw.grad, (p * (1 - p)).expand(2, 5), rtol=1e-3, atol=0)


@pytest.mark.parametrize("value", [0.0, 1.0, -0.25, 1.5])
def test_sigmoid_rejects_values_on_or_outside_the_boundary(value):
    layout = build_layout(EXPERTS, SHAPES, "layer")
    with pytest.raises(ValueError, match=rf"initial coefficient {re.escape(str(value))} is outside the sigmoid range \(0.0, 1.0\)"):
        MergeCoefficients(layout, init=value, constraint="sigmoid")


def test_sigmoid_stays_inside_its_range():
    sigmoid = Sigmoid(0.0, 2.0)
    effective = sigmoid.to_effective(torch.tensor([-30.0, 0.0, 30.0]))
    assert effective[1] == 1.0
    assert torch.all((effective >= 0) & (effective <= 2))


def test_clamp_projects_back_into_range():
    layout = build_layout(EXPERTS, SHAPES, "layer")
    coefficients = MergeCoefficients(layout, init=0.5, constraint=Clamp(0.0, 1.0))
    assert torch.equal(coefficients(), torch.full((2, 5), 0.5))
    with torch.no_grad():
        coefficients.raw.copy_(torch.tensor([[-0.5, 0.2, 1.7, 0.9, 3.0], [0.0, 1.0, -1e-3, 0.4, 1.0001]]))
    assert coefficients().min() == 0.0 and coefficients().max() == 1.0  # clamped in the forward
    coefficients.project_()
    expected = torch.tensor([[0.0, 0.2, 1.0, 0.9, 1.0], [0.0, 1.0, 0.0, 0.4, 1.0]])
    assert torch.equal(coefficients.raw.detach(), expected)
    with pytest.raises(ValueError, match=r"initial coefficient 1.5 is outside the clamp range \[0.0, 1.0\]"):
        MergeCoefficients(layout, init=1.5, constraint="clamp")
    # the bounds themselves are fine for a clamp
    assert torch.equal(MergeCoefficients(layout, init=1.0, constraint="clamp")(), torch.ones(2, 5))


def test_make_constraint_specs():
    assert type(make_constraint(None)) is Constraint and type(make_constraint("none")) is Constraint
    clamp = make_constraint({"name": "clamp", "lo": -1, "hi": 2})
    assert isinstance(clamp, Clamp) and (clamp.lo, clamp.hi) == (-1.0, 2.0)
    assert isinstance(make_constraint("sigmoid"), Sigmoid)
    same = Sigmoid(0, 3)
    assert make_constraint(same) is same
    with pytest.raises(ValueError, match=r"unknown constraint 'tanh'; use one of \['none', 'clamp', 'sigmoid', 'mask'\]"):
        make_constraint("tanh")
    with pytest.raises(ValueError, match="lo < hi"):
        Clamp(1.0, 1.0)
    with pytest.raises(ValueError, match="lo < hi"):
        Sigmoid(2.0, 1.0)
    unbounded = make_constraint(None)
    raw = torch.tensor([-5.0, 7.0])
    assert torch.equal(unbounded.to_effective(raw), raw)


def test_a_mask_is_lo_or_hi_with_the_straight_through_gradient_of_its_relaxation():
    mask = Mask(lo=0.0, hi=0.3, temperature=10.0)
    raw = torch.tensor([-2.0, -0.1, 0.0, 1e-6, 0.1, 5.0], requires_grad=True)
    effective = mask.to_effective(raw)
    assert torch.equal(effective, torch.tensor([0.0, 0.0, 0.0, 0.3, 0.3, 0.3]))  # m > 0 keeps, exactly
    weights = torch.tensor([1.0, -2.0, 3.0, 0.5, -1.0, 2.0])
    (effective * weights).sum().backward()
    p = torch.sigmoid(raw.detach() / 10.0)
    torch.testing.assert_close(raw.grad, weights * 0.3 * p * (1 - p) / 10.0)  # λ·σ'(m/T)/T


def test_a_mask_starts_at_its_values_and_refuses_any_other():
    layout = build_layout(EXPERTS, SHAPES, "layer")
    init = torch.tensor([[0.5, -1.0, 0.5, 0.5, -1.0], [-1.0, 0.5, 0.5, -1.0, 0.5]])
    coefficients = MergeCoefficients(layout, init=init, constraint={"name": "mask", "lo": -1.0, "hi": 0.5})
    assert torch.equal(coefficients(), init) and torch.equal(coefficients.residual, torch.zeros(2, 5))
    assert torch.equal(coefficients.raw.detach(), torch.where(init > 0, 0.1, -0.1))  # AdaRank's starting logits
    assert make_constraint(coefficients.constraint.describe()).describe() == {"name": "mask", "lo": -1.0, "hi": 0.5, "temperature": 10.0}
    with pytest.raises(ValueError, match=r"initial coefficient 0.30000001192092896 is neither of the mask's values 0.0 and 1.0"):
        MergeCoefficients(layout, init=0.3, constraint="mask")
    with pytest.raises(ValueError, match="temperature > 0"):
        Mask(temperature=0.0)
