"""The ``element`` granularity: the layer-wise slots, each holding one value per entry of its tensor."""

from __future__ import annotations

import torch

from adamerge import build_layout
from adamerge.core.element import ElementCoefficients
from adamerge.core.granularities.element import element

SHAPES = {"w": (3, 2), "b": (3,)}


def test_slots_are_the_layer_wise_ones_with_the_tensors_shapes():
    slots = element(SHAPES)
    assert [tuple(slots(key)) for key in SHAPES] == [("w",), ("b",)]
    layout = build_layout(("a", "b"), SHAPES, "element")
    assert layout.granularity == "element" and layout.slot_names == build_layout(("a", "b"), SHAPES, "layer").slot_names
    coefficients = ElementCoefficients(layout, SHAPES, init=0.3)
    assert coefficients.effective("w").shape == (2, 3, 2) and coefficients.effective("b").shape == (2, 3)
    assert torch.equal(coefficients.effective("w"), torch.full((2, 3, 2), 0.3))
