"""Granularities are registered layout rules: the registry, how ``build_layout`` turns a rule's
slot names into a layout, and a new granularity added in a test and merged with end to end.

(The built-in rules' exact slot names and order are pinned in tests/test_coefficients.py.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adamerge import MergedModel, TaskVectors, build_layout
from adamerge.app.config import RecipeError, load_recipe
from adamerge.core.granularities import GRANULARITIES, misplaced_options, option_names, register_granularity

SHAPES = {"a.weight": (4, 3), "a.bias": (4,), "b.weight": (2, 4), "b.bias": (2,)}


@pytest.fixture
def kind():
    """A toy granularity: one slot per parameter kind (every ``*.weight`` shares one, every ``*.bias`` another)."""

    @register_granularity("kind")
    def by_kind(shapes):
        return lambda key: (key.rsplit(".", 1)[-1],)

    yield "kind"
    GRANULARITIES.unregister("kind")


@pytest.fixture
def rule():
    """A granularity whose slots a test sets per tensor, with one option of its own."""
    given: dict[str, tuple[str, ...]] = {}

    @register_granularity("given")
    def by_table(shapes, table=None):
        return lambda key: given[key]

    yield given
    GRANULARITIES.unregister("given")


def test_the_built_in_rules_are_registered_in_order_with_their_options():
    assert list(GRANULARITIES) == ["task", "layer", "group", "chunk", "element", "spectral"]
    assert {name: r.options for name, r in GRANULARITIES.items()} == {
        "task": (), "layer": (), "group": ("groups",), "chunk": ("chunks",), "element": (), "spectral": ("rank",),
    }
    assert option_names() == {"groups", "chunks", "rank"}


def test_a_registered_rule_is_found_and_the_closest_to_an_unknown_name(kind):
    assert GRANULARITIES.get("kind").build(SHAPES)("a.bias") == ("bias",)
    with pytest.raises(ValueError) as caught:
        build_layout(("x",), SHAPES, "kinds")
    assert str(caught.value) == (
        "unknown granularity 'kinds' (did you mean 'kind'?); use one of ['chunk', 'element', 'group', 'kind', 'layer', 'spectral', 'task']"
    )


def test_slots_are_numbered_in_order_of_first_use_and_shared_by_name(rule):
    rule.update({"a.weight": ("p", "q"), "a.bias": ("q",), "b.weight": ("r",), "b.bias": ("p",)})
    layout = build_layout(("x", "y"), SHAPES, "given")
    assert layout.slot_names == ("p", "q", "r")
    assert layout.tensor_slots == {"a.weight": (0, 1), "a.bias": (1,), "b.weight": (2,), "b.bias": (0,)}
    assert layout.granularity == "given" and layout.frozen == frozenset()


def test_no_slot_freezes_a_tensor_as_a_freeze_pattern_does(rule):
    rule.update({"a.weight": ("p",), "a.bias": (), "b.weight": ("p",), "b.bias": ("p",)})
    layout = build_layout(("x",), SHAPES, "given", freeze=r"^b\.bias$")
    assert layout.slot_names == ("p", "a.bias (frozen)", "b.bias (frozen)")
    assert layout.frozen_slots == [1, 2] and layout.trainable_slots == [0]


def test_a_rule_cannot_give_a_tensor_more_slots_than_rows(rule):
    rule.update({k: ("p",) for k in SHAPES} | {"b.bias": ("p", "q", "r")})
    with pytest.raises(ValueError, match=r"granularity 'given' gives 'b\.bias' 3 slots but it has 2 rows"):
        build_layout(("x",), SHAPES, "given")


def test_options_reach_only_the_rule_that_takes_them(rule):
    rule.update({k: ("p",) for k in SHAPES})
    assert build_layout(("x",), SHAPES, "given", table={"unused": 1}).slot_names == ("p",)
    with pytest.raises(ValueError, match="'table' is only used with granularity 'given', not 'layer'"):
        build_layout(("x",), SHAPES, "layer", table={})
    with pytest.raises(ValueError, match="'rows' is not an option of any granularity; 'chunk' takes \\['chunks'\\]"):
        build_layout(("x",), SHAPES, "chunk", rows=2)
    assert build_layout(("x",), SHAPES, "layer", groups=None, chunks=None).slot_names == tuple(SHAPES)  # None: not given
    assert misplaced_options("group", {"groups": "block", "chunks": 3}, label=lambda o: f"coefficients.{o}") == [
        "coefficients.chunks is only used with granularity 'chunk', not 'group'"
    ]


RECIPE = {"problem": {"kind": "hf_sequence_classification", "pretrained": "/nonexistent/model"}}  # never read


def test_the_recipe_check_reads_the_registry(kind):
    assert load_recipe(RECIPE, ["coefficients.granularity=kind"]).coefficients.granularity == "kind"
    with pytest.raises(RecipeError, match=r"coefficients\.chunks is only used with granularity 'chunk', not 'kind'"):
        load_recipe(RECIPE, ["coefficients.granularity=kind", "coefficients.chunks=2"])


def test_the_recipe_check_refuses_an_unregistered_granularity():
    with pytest.raises(RecipeError, match=r"^recipe: coefficients\.granularity: unknown granularity 'kind'; use one of \['chunk', "):
        load_recipe(RECIPE, ["coefficients.granularity=kind"])


def test_a_new_granularity_merges_exactly(kind):
    torch.manual_seed(0)
    pretrained = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    base = {k: v.detach().clone() for k, v in pretrained.state_dict().items()}
    experts = {name: {k: v + torch.randn_like(v) for k, v in base.items()} for name in ("x", "y")}
    tv = TaskVectors.from_models(pretrained, experts)
    init = torch.tensor([[0.2, 0.7], [0.5, -0.3]])  # [expert, slot]; slots in order of first use: weight, bias
    merged = MergedModel(copy.deepcopy(pretrained), tv, "kind", init=init)
    assert merged.layout.slot_names == ("weight", "bias")
    assert merged.layout.tensor_slots == {"0.weight": (0,), "0.bias": (1,), "2.weight": (0,), "2.bias": (1,)}
    params = merged.merged_parameters()
    for key, theta0 in base.items():
        s = 0 if key.endswith("weight") else 1
        expected = theta0 + sum(init[k, s] * (experts[e][key] - theta0) for k, e in enumerate(("x", "y")))
        torch.testing.assert_close(params[key], expected, rtol=0, atol=1e-6)
    x = torch.randn(5, 3)
    reference = copy.deepcopy(pretrained)
    reference.load_state_dict({k: params[k].detach() for k in base})
    torch.testing.assert_close(merged(x), reference(x))
