"""The ``spectral`` granularity: a matrix gets one slot per singular component (min(m, n)); with a
rank, the top ``r`` and one for the rest (none when the rest would be one component or none);
other tensors one slot, as ``layer``; a bad rank is named; the layout holds the slots."""

from __future__ import annotations

import pytest

from adamerge import build_layout
from adamerge.core.granularities.spectral import spectral

SHAPES = {"emb.weight": (10, 4), "layers.0.w": (6, 3), "layers.0.b": (6,), "head.w": (1, 4), "scale": (), "conv": (2, 3, 3)}


def test_every_component_of_a_matrix_has_a_slot_and_other_tensors_one():
    slots = spectral(SHAPES)
    assert tuple(slots("emb.weight")) == ("emb.weight[sv0]", "emb.weight[sv1]", "emb.weight[sv2]", "emb.weight[sv3]")
    assert len(slots("layers.0.w")) == 3  # min(6, 3)
    assert tuple(slots("head.w")) == ("head.w[sv0]",)  # a rank-one matrix is its only component
    assert [tuple(slots(k)) for k in ("layers.0.b", "scale", "conv")] == [("layers.0.b",), ("scale",), ("conv",)]


def test_a_rank_keeps_the_top_components_and_one_slot_for_the_rest():
    slots = spectral(SHAPES, rank=2)
    assert tuple(slots("emb.weight")) == ("emb.weight[sv0]", "emb.weight[sv1]", "emb.weight[rest]")
    assert tuple(slots("layers.0.w")) == ("layers.0.w[sv0]", "layers.0.w[sv1]", "layers.0.w[sv2]")  # rest = sv2 alone
    assert tuple(spectral(SHAPES, rank=1)("emb.weight")) == ("emb.weight[sv0]", "emb.weight[rest]")
    assert len(spectral(SHAPES, rank=100)("emb.weight")) == 4
    assert tuple(slots("layers.0.b")) == ("layers.0.b",)


@pytest.mark.parametrize("rank", [0, -1, 2.5, True, "3"])
def test_a_bad_rank_is_named(rank):
    with pytest.raises(ValueError, match=rf"rank must be a positive integer \(components per matrix\), got {rank!r}"):
        spectral(SHAPES, rank=rank)


def test_the_layout_numbers_the_slots_and_round_trips_through_json():
    layout = build_layout(["a", "b"], SHAPES, "spectral", rank=1, freeze=r"^head")
    assert layout.granularity == "spectral" and layout.num_slots == 2 + 2 + 1 + 1 + 1 + 1
    assert layout.tensor_slots["layers.0.w"] == (2, 3) and layout.tensor_slots["head.w"] == (5,)
    assert layout.frozen_slots == [5]
    assert type(layout).from_json(layout.to_json()) == layout
    with pytest.raises(ValueError, match="'rank' is only used with granularity 'spectral', not 'layer'"):
        build_layout(["a"], SHAPES, "layer", rank=2)
