"""The merge scope and the checks on what experts bring, on hand-made tensors: include/exclude
regexes, naming experts, tied aliases, the floating-point scope, and the one-line errors that
name the expert and the key (missing, extra, shape, dtype, non-finite)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adamerge.core.scope import check_keys, check_tensor, expert_tensors, in_scope, name_experts, parameter_aliases, scope_keys


def test_include_and_exclude_regexes():
    assert in_scope("a.b", include=None, exclude=None)
    assert not in_scope("a.b", include="x")
    assert in_scope("a.b", include=["x", r"^a\."])  # any include
    assert not in_scope("a.b", include="a", exclude=r"\.b$")  # every exclude wins


def test_experts_are_named_in_order_and_a_single_model_is_refused():
    assert list(name_experts(["p", "q"])) == ["expert_0", "expert_1"]
    assert name_experts({"x": "p"}) == {"x": "p"}
    with pytest.raises(TypeError, match="not a single model"):
        name_experts(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="not a single state dict"):
        name_experts({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="no experts given"):
        name_experts([])


def test_tied_parameters_are_aliases_of_the_first_name():
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight
    assert parameter_aliases(model) == {"1.weight": "0.weight"}


def test_the_scope_is_the_selected_floating_point_tensors():
    base = {"w": torch.zeros(2, 2), "b": torch.zeros(2), "steps": torch.zeros(1, dtype=torch.long)}
    assert scope_keys(base, base) == ["w", "b"]  # the integer buffer is not merged
    assert scope_keys(base, base, exclude="b") == ["w"]
    with pytest.raises(ValueError, match=r"the merge scope is empty: include='x' exclude=None"):
        scope_keys(base, base, include="x")


def test_errors_name_the_expert_and_the_key():
    base, keys = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}, ["w", "b"]
    with pytest.raises(KeyError, match=r"expert 'e' is missing 1 key\(s\) of the merge scope, first 'b' \(the expert has 'model\.b'"):
        check_keys("e", {"w": torch.zeros(2, 3), "model.b": torch.zeros(2)}, base, keys, {}, None, None)
    with pytest.raises(KeyError, match=r"expert 'e' has key 'extra\.w' \(and 0 more\).*exclude=\['extra'\]"):
        check_keys("e", {**base, "extra.w": torch.zeros(1)}, base, keys, {}, None, None)
    check_keys("e", {**base, "extra.w": torch.zeros(1)}, base, keys, {}, None, "extra")  # excluded: fine
    with pytest.raises(ValueError, match=r"shape mismatch for 'w': expert 'e' has \(3, 2\), the pretrained model has \(2, 3\)"):
        check_tensor("expert 'e'", "w", torch.zeros(3, 2), base["w"])
    check_tensor("expert 'e'", "w", torch.zeros(2, 3, dtype=torch.bfloat16), base["w"])  # floating: read in float32
    with pytest.raises(ValueError, match=r"dtype mismatch for 'w': expert 'e' is torch.int32"):
        check_tensor("expert 'e'", "w", torch.zeros(2, 3, dtype=torch.int32), base["w"])
    with pytest.raises(ValueError, match=r"expert 'e' has non-finite values \(NaN/inf\) in 'b'"):
        check_tensor("expert 'e'", "b", torch.tensor([0.0, float("nan")]), base["b"])


def test_expert_tensors_reads_the_scope_in_order():
    base = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}
    expert = {"w": torch.ones(2, 3), "b": torch.full((2,), 2.0)}
    read = list(expert_tensors("e", expert, base, base, ["b", "w"]))
    assert [key for key, _ in read] == ["b", "w"] and torch.equal(read[0][1], expert["b"])
