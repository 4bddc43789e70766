"""The granularity registry: a registered rule keeps the options its signature names; an option
given to a granularity that does not take it is named with the granularity that does."""

from __future__ import annotations

import pytest

from adamerge import build_layout
from adamerge.core.granularities.registry import GRANULARITIES, misplaced_options, option_names, register_granularity


def test_the_built_in_rules_and_their_options():
    assert GRANULARITIES.names() == ["chunk", "element", "group", "layer", "spectral", "task"]
    assert GRANULARITIES.get("chunk").options == ("chunks",) and GRANULARITIES.get("layer").options == ()
    assert option_names() >= {"chunks", "groups"}


def test_a_registered_rule_lays_out_coefficients_and_takes_its_own_options():
    @register_granularity("by_first_letter")
    def by_first_letter(shapes, upper: bool = False):
        return lambda key: (key[0].upper() if upper else key[0],)

    try:
        assert GRANULARITIES.get("by_first_letter").options == ("upper",) and "upper" in option_names()
        layout = build_layout(("a", "b"), {"wa": (2,), "wb": (3,), "v": (1,)}, "by_first_letter", upper=True)
        assert layout.slot_names == ("W", "V") and layout.tensor_slots["wb"] == (0,)
    finally:
        GRANULARITIES.unregister("by_first_letter")


def test_misplaced_options_name_the_granularity_that_takes_them():
    assert misplaced_options("chunk", {"chunks": 2, "groups": None}) == []  # None: not given
    assert misplaced_options("layer", {"chunks": 2}) == ["'chunks' is only used with granularity 'chunk', not 'layer'"]
    assert misplaced_options("task", {"rows": 1}) == ["'rows' is not an option of any granularity; 'task' takes []"]
    with pytest.raises(ValueError, match="unknown granularity 'neuron'"):
        misplaced_options("neuron", {})
