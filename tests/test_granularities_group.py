"""The ``group`` granularity: one slot per numbered block (else per module) by default, or per
named / listed regex with unmatched tensors in ``other``; the block and module of a name."""

from __future__ import annotations

import pytest

from adamerge.core.granularities.group import block_of, group, module_of

SHAPES = {"emb.weight": (10, 4), "layers.0.w": (6, 4), "layers.0.b": (6,), "layers.1.w": (6, 4), "head.w": (3, 4)}


def test_block_and_module_names():
    assert block_of("encoder.layer.3.attention.self.query.weight") == "encoder.layer.3"
    assert block_of("0.weight") == "0"
    assert block_of("layer10.weight") is None  # "10" must be a whole component
    assert block_of("emb.weight") is None
    assert module_of("a.b.weight") == "a.b" and module_of("scale") == "scale"


def test_blocks_by_default_and_modules_for_the_rest():
    for groups in (None, "block"):
        slots = group(SHAPES, groups=groups)
        assert {key: tuple(slots(key)) for key in SHAPES} == {
            "emb.weight": ("emb",), "layers.0.w": ("layers.0",), "layers.0.b": ("layers.0",),
            "layers.1.w": ("layers.1",), "head.w": ("head",),
        }


def test_the_first_matching_regex_names_the_group_and_the_rest_share_other():
    named = group(SHAPES, groups={"body": r"^layers\.", "top": "head"})
    assert [named(key)[0] for key in SHAPES] == ["other", "body", "body", "body", "top"]
    listed = group(SHAPES, groups=[r"\.0\.", "layers"])
    assert [listed(key)[0] for key in ("layers.0.b", "layers.1.w", "head.w")] == [r"\.0\.", "layers", "other"]
    with pytest.raises(ValueError, match="unknown groups 'blocks'"):
        group(SHAPES, groups="blocks")
