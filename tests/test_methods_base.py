"""What every data-free method shares (methods/base and the registry): a module in gives a module
out with tied weights kept tied and buffers untouched, a state dict gives a state dict, matrices
merged as matrices by the SVD methods and every other tensor by the mean, embedding tables found by
type or name, a start merge's update as a task vector, methods found by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adamerge as am
from adamerge import methods
from adamerge.core.task_vectors import TaskVectors
from adamerge.methods import (
    METHODS,
    embedding_keys,
    iso_c_delta,
    iso_cts_delta,
    tsv_delta,
)
from adamerge.methods.base import with_start

# uniform shifts of +0.2 and +0.4 on every parameter: Σ τ = 0.6 everywhere
SHIFTS = {
    "average": {"embedding.weight": 0.3, "hidden.weight": 0.3, "hidden.bias": 0.3},
    "task_arithmetic": {"embedding.weight": 0.18, "hidden.weight": 0.18, "hidden.bias": 0.18},
    # modules embedding, hidden: depths 1, 2; λ = 1/2 + 1/2 (ℓ - 1) -> 0.5, 1.0
    "lines": {"embedding.weight": 0.3, "hidden.weight": 0.6, "hidden.bias": 0.6},
    "ties": None,
    "dare": None,
}


@pytest.mark.parametrize("name", sorted(SHIFTS))
def test_module_in_module_out_with_tied_aliases(shifted_tied_lm, name):
    model, experts = shifted_tied_lm([0.2, 0.4])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = METHODS.get(name)(model, experts)
    assert type(merged) is type(model) and merged is not model
    assert merged.head.weight is merged.embedding.weight  # still tied
    assert torch.equal(merged.scale, before["scale"])  # buffers are untouched
    assert not torch.equal(merged.embedding.weight, before["embedding.weight"])
    if SHIFTS[name] is not None:
        for key, shift in SHIFTS[name].items():
            torch.testing.assert_close(merged.state_dict()[key], before[key] + shift, msg=key)
    # the input model is not modified
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    with torch.no_grad():
        merged(torch.tensor([[0, 3, 4]]))  # a working module


@pytest.mark.parametrize("name", ["average", "task_arithmetic"])
def test_state_dict_in_state_dict_out(shifted_tied_lm, name):
    model, experts = shifted_tied_lm([0.2, 0.4])
    merged = METHODS.get(name)(model, experts)
    as_dict = METHODS.get(name)(model.state_dict(), [e.state_dict() for e in experts])
    assert isinstance(as_dict, dict) and not isinstance(as_dict, nn.Module)
    assert set(as_dict) == set(model.state_dict())
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(as_dict[key], value, msg=key)


def test_an_unknown_method_name_gets_the_closest_one():
    assert METHODS.get("ties") is methods.ties
    with pytest.raises(KeyError, match=r"^unknown merge method 'tise' \(did you mean 'ties'\?\); use one of \[.*'average'.*'dare'.*'lines'.*'task_arithmetic'.*'ties'.*\]$"):
        METHODS.get("tise")


def test_a_registered_method_is_found_by_name_where_a_start_merge_is_named(hand_experts):
    theta0, experts = hand_experts
    @METHODS.register("_test_first_expert")
    def first_expert(pretrained, experts, include=None, exclude=None):
        return methods.apply_deltas(pretrained, {k: experts[0][k] - theta0[k] for k in ("w", "b")})

    try:
        tv = with_start(TaskVectors.from_models(theta0, experts), theta0, experts, "_test_first_expert", {})
        torch.testing.assert_close(tv["w"][0], experts[0]["w"] - theta0["w"])
    finally:
        METHODS.unregister("_test_first_expert")
    assert "_test_first_expert" not in METHODS


def test_a_start_vector_at_one_is_its_merge_and_the_experts_rows_are_their_task_vectors(ref):
    """``with_start``: coefficient 1 on the data-free merge's update and 0 on the experts is that
    merge exactly (here TIES, which no per-expert weighting of raw τ reproduces)."""
    base, experts = ref.mlp_zoo()
    plain = am.TaskVectors.from_models(base, experts)
    tv = with_start(plain, base, experts, "ties", {"density": 0.5})
    assert tv.expert_names == ("start", "expert_0", "expert_1", "expert_2")
    init = {"start": 1.0, "expert_0": 0.0, "expert_1": 0.0, "expert_2": 0.0}
    merged = am.MergedModel(base, tv, "layer", init=init)
    reference = METHODS.get("ties")(base, experts, density=0.5).state_dict()
    for key, tensor in merged.merged_parameters().items():
        ref.close(tensor, reference[key], atol=1e-6)
        assert torch.equal(tv[key][1:], plain[key])
    with pytest.raises(ValueError, match="an expert is named 'start'"):
        with_start(am.TaskVectors.from_models(base, {"start": experts[0]}), base, {"start": experts[0]}, "ties", {})


def stacks(model, experts):
    base = model.state_dict()
    return {k: torch.stack([e.state_dict()[k] - base[k] for e in experts]) for k in base}


MATRIX = {"embed.weight", "lin1.weight", "lin2.weight"}
OTHER = {"lin1.bias", "norm.weight", "norm.bias", "lin2.bias"}
SVD_METHODS = {
    "tsv": (dict(alpha=0.5), lambda t: tsv_delta(t, alpha=0.5)),
    "iso_c": (dict(alpha=0.5), lambda t: iso_c_delta(t, alpha=0.5)),
    "iso_cts": (dict(alpha=0.5, common_fraction=0.6), lambda t: iso_cts_delta(t, alpha=0.5, common_fraction=0.6)),
}


@pytest.mark.parametrize("name", sorted(SVD_METHODS))
def test_svd_methods_on_a_module_and_a_state_dict(ref, tiny_encoder_zoo, name):
    model, experts = tiny_encoder_zoo
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args, delta_of = SVD_METHODS[name]
    method = METHODS.get(name)
    assert method is getattr(am.methods, name)
    merged = method(model, experts, **args)
    assert type(merged) is type(model) and merged is not model
    state, taus = merged.state_dict(), stacks(model, experts)
    for key in MATRIX:  # every 2-D tensor, the embedding table included, is merged as a matrix
        ref.close(state[key], before[key] + delta_of(taus[key]), atol=1e-5)
    for key in OTHER:  # every other tensor: α × mean_k τ_k
        ref.close(state[key], before[key] + 0.5 * taus[key].mean(0), atol=1e-6)
    for key, value in model.state_dict().items():  # the input model is untouched
        assert torch.equal(value, before[key])
    as_dict = method(model.state_dict(), [e.state_dict() for e in experts], **args)
    assert isinstance(as_dict, dict)
    for key, value in state.items():
        ref.close(as_dict[key], value, atol=1e-6)
    with torch.no_grad():
        merged(torch.tensor([[0, 3, 10]]))


def test_embedding_keys_by_module_type_and_tied_alias():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 9, bias=False)  # registered first: canonical name of the tied weight
            self.table = nn.Embedding(9, 4)
            self.table.weight = self.head.weight

    model = Tied()
    keys = [n for n, _ in model.named_parameters()]
    assert keys == ["head.weight"]
    assert embedding_keys(model, keys) == {"head.weight"}
    tables = ["bert.embeddings.word_embeddings.weight", "model.embed_tokens.weight", "transformer.wte.weight"]
    names = tables + ["encoder.layer.0.attention.self.query.weight", "lm_head.weight"]
    assert embedding_keys(model.state_dict(), names) == set(tables)


def test_merging_on_a_device_hands_every_rule_its_task_vectors_there_and_keeps_the_result_on_the_host():
    """The device plumbing of every data-free merge (``merge_each``), checked with the meta device:
    each key's task vectors reach the rule on it, the merged model stays where θ_0 is."""
    from adamerge.methods.base import merge_each, merging_on, task_vectors

    base = nn.Linear(3, 2)
    experts = {name: {k: v + 1.0 for k, v in base.state_dict().items()} for name in ("a", "b")}
    seen = []

    def rule(key, taus):
        seen.append(taus.device)
        return torch.zeros(taus.shape[1:], device=taus.device) if taus.device.type == "cpu" else None

    with merging_on("meta"):
        merged = merge_each(base, task_vectors(base, experts, None, None), rule)
    assert seen == [torch.device("meta")] * 2 and all(p.device.type == "cpu" for p in merged.parameters())
    seen.clear()
    merge_each(base, task_vectors(base, experts, None, None), rule)  # outside: where they are read
    assert seen == [torch.device("cpu")] * 2
