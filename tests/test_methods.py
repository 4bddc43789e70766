"""Data-free merges against results written out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adamerge import methods
from adamerge.core.task_vectors import TaskVectors
from adamerge.methods import METHODS, layer_depths
from adamerge.methods.base import with_start

# θ_0, and two experts whose task vectors are
#   τ_1: w = [ 1, -2, 3, 0], b = [1, 0]
#   τ_2: w = [-3,  1, 2, 0], b = [0, 2]
THETA0 = {"w": torch.tensor([0.0, 0.0, 0.0, 0.0]), "b": torch.tensor([1.0, 1.0])}
THETA1 = {"w": torch.tensor([1.0, -2.0, 3.0, 0.0]), "b": torch.tensor([2.0, 1.0])}
THETA2 = {"w": torch.tensor([-3.0, 1.0, 2.0, 0.0]), "b": torch.tensor([1.0, 3.0])}
EXPERTS = [THETA1, THETA2]


def assert_state(result, expected):
    assert isinstance(result, dict)
    assert set(result) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(result[key], torch.tensor(value), rtol=0, atol=1e-6, msg=key)


def test_average():
    assert_state(methods.average(THETA0, EXPERTS), {"w": [-1.0, -0.5, 2.5, 0.0], "b": [1.5, 2.0]})


def test_task_arithmetic_scalar_and_per_expert():
    assert_state(methods.task_arithmetic(THETA0, EXPERTS, scaling=0.5), {"w": [-1.0, -0.5, 2.5, 0.0], "b": [1.5, 2.0]})
    assert_state(
        methods.task_arithmetic(THETA0, EXPERTS, scaling=[1.0, 0.5]), {"w": [-0.5, -1.5, 4.0, 0.0], "b": [2.0, 2.0]}
    )
    assert_state(methods.task_arithmetic(THETA0, EXPERTS, scaling=0.0), {"w": [0.0] * 4, "b": [1.0, 1.0]})
    with pytest.raises(ValueError, match="scaling has 3 values but there are 2 experts"):
        methods.task_arithmetic(THETA0, EXPERTS, scaling=[1.0, 0.5, 0.1])


def test_task_arithmetic_scope_keeps_the_rest():
    assert_state(methods.task_arithmetic(THETA0, EXPERTS, scaling=1.0, include="b"), {"w": [0.0] * 4, "b": [2.0, 3.0]})


def test_ties_without_trim():
    # sign (sum): w [-2, -1, 5, 0] -> [-, -, +, + (tie)]; b [1, 2] -> [+, +]
    # disjoint mean: w [-3, -2, (3+2)/2, 0]; b [1, 2]
    assert_state(methods.ties(THETA0, EXPERTS, density=1.0, scaling=1.0), {"w": [-3.0, -2.0, 2.5, 0.0], "b": [2.0, 3.0]})


def test_ties_per_tensor_trim():
    # keep ceil(0.5 n) per tensor: τ_1 w [0, -2, 3, 0], τ_2 w [-3, 0, 2, 0]; b unchanged (one each)
    # w: signs [-, -, +, +]; mean [-3, -2, 2.5, 0]; scaled by 0.5
    result = methods.ties(THETA0, EXPERTS, density=0.5, scaling=0.5, trim_scope="tensor")
    assert_state(result, {"w": [-1.5, -1.0, 1.25, 0.0], "b": [1.5, 2.0]})


def test_ties_per_model_trim():
    # one threshold per expert over all 6 entries, top 3: τ_1 -> 1 (both ones kept), τ_2 -> 2
    # τ_1 w [1, -2, 3, 0] b [1, 0]; τ_2 w [-3, 0, 2, 0] b [0, 2]
    # w sums [-2, -2, 5, 0] -> [-, -, +, +]: [-3, -2, 2.5, 0]; b [1, 2]
    result = methods.ties(THETA0, EXPERTS, density=0.5, scaling=1.0, trim_scope="model")
    assert_state(result, {"w": [-3.0, -2.0, 2.5, 0.0], "b": [2.0, 3.0]})


def test_ties_count_election():
    # three experts on one entry: +1, +1, -5: count elects +, sum elects -
    base = {"x": torch.tensor([0.0])}
    experts = [{"x": torch.tensor([1.0])}, {"x": torch.tensor([1.0])}, {"x": torch.tensor([-5.0])}]
    assert_state(methods.ties(base, experts, density=1.0, sign_method="count"), {"x": [1.0]})
    assert_state(methods.ties(base, experts, density=1.0, sign_method="sum"), {"x": [-5.0]})


def test_dare_full_density_is_task_arithmetic_or_ties():
    assert_state(methods.dare(THETA0, EXPERTS, density=1.0, scaling=0.5), {"w": [-1.0, -0.5, 2.5, 0.0], "b": [1.5, 2.0]})
    assert_state(
        methods.dare(THETA0, EXPERTS, density=1.0, scaling=0.5, sign_election=True),
        {"w": [-1.5, -1.0, 1.25, 0.0], "b": [1.5, 2.0]},
    )


def test_dare_drops_and_rescales():
    base = {"x": torch.zeros(1000)}
    expert = {"x": torch.full((1000,), 2.0)}
    merged = methods.dare(base, [expert], density=0.25, scaling=0.5, seed=1)["x"]
    # every entry is dropped (0) or kept and rescaled: 0.5 × 2 / 0.25 = 4
    assert set(merged.unique().tolist()) == {0.0, 4.0}
    assert abs((merged != 0).float().mean().item() - 0.25) < 0.05
    assert torch.equal(merged, methods.dare(base, [expert], density=0.25, scaling=0.5, seed=1)["x"])
    assert not torch.equal(merged, methods.dare(base, [expert], density=0.25, scaling=0.5, seed=2)["x"])
    # with sign election: a lone expert agrees with itself, so the same entries survive
    elected = methods.dare(base, [expert], density=0.25, scaling=0.5, seed=1, sign_election=True)["x"]
    assert torch.equal(elected, merged)


def test_dare_sign_election_on_two_experts():
    base = {"x": torch.zeros(4)}
    experts = [{"x": torch.tensor([2.0, -1.0, 4.0, 1.0])}, {"x": torch.tensor([-1.0, -3.0, 2.0, 0.0])}]
    # density 1: elect on sums [1, -4, 6, 1] -> [+, -, +, +]; mean of agreeing [2, -2, 3, 1]
    result = methods.dare(base, experts, density=1.0, scaling=1.0, sign_election=True)
    assert_state(result, {"x": [2.0, -2.0, 3.0, 1.0]})


def test_lines_scales_with_depth():
    base = {k: torch.zeros(2) for k in ("emb.w", "layers.0.w", "layers.1.w", "layers.2.w", "head.w")}
    expert1 = {k: torch.tensor([1.0, 2.0]) for k in base}
    expert2 = {k: torch.tensor([3.0, -2.0]) for k in base}  # Σ τ = [4, 0]
    assert layer_depths(list(base)) == {"emb.w": 1, "layers.0.w": 1, "layers.1.w": 2, "layers.2.w": 3, "head.w": 3}
    # λ = 0.1 + 0.5 (ℓ - 1) / 2 -> 0.1, 0.1, 0.35, 0.6, 0.6
    result = methods.lines(base, [expert1, expert2], alpha=0.1, beta=0.5)
    assert_state(
        result,
        {
            "emb.w": [0.4, 0.0],
            "layers.0.w": [0.4, 0.0],
            "layers.1.w": [1.4, 0.0],
            "layers.2.w": [2.4, 0.0],
            "head.w": [2.4, 0.0],
        },
    )
    # defaults α = β = 1/K = 0.5: λ = 0.5, 0.5, 0.75, 1, 1
    default = methods.lines(base, [expert1, expert2])
    assert [default[k][0].item() for k in base] == pytest.approx([2.0, 2.0, 3.0, 4.0, 4.0])


def test_layer_depths_without_blocks():
    assert layer_depths(["a.weight", "a.bias", "b.weight"]) == {"a.weight": 1, "a.bias": 1, "b.weight": 2}


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(5, 3)
        self.hidden = nn.Linear(3, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embedding.weight
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, ids):
        return self.head(torch.tanh(self.hidden(self.embedding(ids))) * self.scale)


def _experts_of(model, shifts):
    experts = []
    for shift in shifts:
        expert = TiedLM()
        expert.load_state_dict(model.state_dict())
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(shift)
        experts.append(expert)
    return experts


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
def test_module_in_module_out_with_tied_aliases(name):
    torch.manual_seed(0)
    model = TiedLM()
    experts = _experts_of(model, [0.2, 0.4])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = METHODS.get(name)(model, experts)
    assert isinstance(merged, TiedLM) and merged is not model
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
def test_state_dict_in_state_dict_out(name):
    torch.manual_seed(0)
    model = TiedLM()
    experts = _experts_of(model, [0.2, 0.4])
    merged = METHODS.get(name)(model, experts)
    as_dict = METHODS.get(name)(model.state_dict(), [e.state_dict() for e in experts])
    assert isinstance(as_dict, dict) and not isinstance(as_dict, nn.Module)
    assert set(as_dict) == set(model.state_dict())
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(as_dict[key], value, msg=key)


def test_lines_on_module_matches_hand_computation():
    torch.manual_seed(0)
    model = TiedLM()
    experts = _experts_of(model, [0.1, 0.3])  # Σ τ = 0.4 everywhere
    merged = methods.lines(model, experts, alpha=0.5, beta=1.0)
    # modules embedding, hidden (no numbered blocks): depths 1, 2 -> λ = 0.5, 1.5
    torch.testing.assert_close(merged.embedding.weight, model.embedding.weight + 0.2)
    torch.testing.assert_close(merged.hidden.weight, model.hidden.weight + 0.6)
    torch.testing.assert_close(merged.head.weight, merged.embedding.weight)


def test_an_unknown_method_name_gets_the_closest_one():
    assert METHODS.get("ties") is methods.ties
    with pytest.raises(KeyError, match=r"^unknown merge method 'tise' \(did you mean 'ties'\?\); use one of \[.*'average'.*'dare'.*'lines'.*'task_arithmetic'.*'ties'.*\]$"):
        METHODS.get("tise")


def test_a_registered_method_is_found_by_name_where_a_start_merge_is_named():
    @METHODS.register("_test_first_expert")
    def first_expert(pretrained, experts, include=None, exclude=None):
        return methods.apply_deltas(pretrained, {k: THETA1[k] - THETA0[k] for k in ("w", "b")})

    try:
        tv = with_start(TaskVectors.from_models(THETA0, EXPERTS), THETA0, EXPERTS, "_test_first_expert", {})
        torch.testing.assert_close(tv["w"][0], THETA1["w"] - THETA0["w"])
    finally:
        METHODS.unregister("_test_first_expert")
    assert "_test_first_expert" not in METHODS