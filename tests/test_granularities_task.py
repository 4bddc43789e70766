"""The ``task`` granularity: one coefficient per expert for the whole model."""

from __future__ import annotations

from adamerge import build_layout
from adamerge.core.granularities.task import task

SHAPES = {"emb.weight": (10, 4), "layers.0.w": (6, 4), "head.b": (3,)}


def test_every_tensor_reads_the_one_slot_all():
    slots = task(SHAPES)
    assert {key: tuple(slots(key)) for key in SHAPES} == {key: ("all",) for key in SHAPES}
    layout = build_layout(("a", "b"), SHAPES, "task")
    assert layout.slot_names == ("all",) and layout.num_slots == 1
    assert set(layout.tensor_slots.values()) == {(0,)}
