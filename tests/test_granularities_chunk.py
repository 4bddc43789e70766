"""The ``chunk`` granularity: ``m`` slots per tensor over contiguous row chunks; ``m`` from an int or
a map (exact names before regexes, unlisted tensors 1); ``m = 0`` names no slot; bad counts named."""

from __future__ import annotations

import pytest

from adamerge.core.granularities.chunk import chunk

SHAPES = {"emb.weight": (10, 4), "layers.0.w": (6, 4), "layers.1.w": (6, 4), "head.w": (3, 4), "scale": ()}


def test_an_int_gives_every_tensor_m_slots_named_by_chunk():
    slots = chunk(SHAPES, chunks=3)
    assert tuple(slots("head.w")) == ("head.w[0/3]", "head.w[1/3]", "head.w[2/3]")
    assert tuple(chunk(SHAPES, chunks=1)("emb.weight")) == ("emb.weight",)  # m = 1 is the layer-wise slot


def test_a_map_takes_exact_names_before_regexes_and_leaves_the_rest_at_one():
    slots = chunk(SHAPES, chunks={r"layers\.\d+\.w": 2, "layers.1.w": 3, "head.w": 0})
    assert tuple(slots("layers.0.w")) == ("layers.0.w[0/2]", "layers.0.w[1/2]")
    assert len(slots("layers.1.w")) == 3  # its exact name wins over the regex that also matches it
    assert tuple(slots("head.w")) == ()  # m = 0: no slot, the coefficient stays at its initial value
    assert tuple(slots("emb.weight")) == ("emb.weight",) and tuple(slots("scale")) == ("scale",)


def test_counts_beyond_the_rows_or_below_zero_are_refused():
    with pytest.raises(ValueError, match=r"chunks for 'head\.w': m=4 exceeds its first dimension \(3\)"):
        chunk(SHAPES, chunks={"head.w": 4})("head.w")
    with pytest.raises(ValueError, match="m=2 exceeds its first dimension \\(1\\)"):
        chunk(SHAPES, chunks=2)("scale")  # a 0-d tensor has one row
    with pytest.raises(ValueError, match="chunk counts must be >= 0, got -1"):
        chunk(SHAPES, chunks={"head.w": -1})
