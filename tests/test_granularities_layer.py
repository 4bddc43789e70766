"""The ``layer`` granularity: one coefficient per expert and tensor, slots in the tensors' order."""

from __future__ import annotations

from adamerge import build_layout
from adamerge.core.granularities.layer import layer

SHAPES = {"emb.weight": (10, 4), "layers.0.w": (6, 4), "head.b": (3,)}


def test_each_tensor_reads_a_slot_of_its_own_name():
    slots = layer(SHAPES)
    assert [tuple(slots(key)) for key in SHAPES] == [(key,) for key in SHAPES]
    layout = build_layout(("a", "b"), SHAPES, "layer")
    assert layout.slot_names == tuple(SHAPES)
    assert [layout.tensor_slots[key] for key in SHAPES] == [(0,), (1,), (2,)]
