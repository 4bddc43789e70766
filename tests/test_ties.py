"""TIES by hand: trim (per tensor or per model), elect a sign (by mass or by votes), the disjoint mean, scaled."""

from __future__ import annotations

import torch

from adamerge import methods


def test_ties_without_trim(hand_experts, assert_state):
    theta0, experts = hand_experts
    # sign (sum): w [-2, -1, 5, 0] -> [-, -, +, + (tie)]; b [1, 2] -> [+, +]
    # disjoint mean: w [-3, -2, (3+2)/2, 0]; b [1, 2]
    assert_state(methods.ties(theta0, experts, density=1.0, scaling=1.0), {"w": [-3.0, -2.0, 2.5, 0.0], "b": [2.0, 3.0]})


def test_ties_per_tensor_trim(hand_experts, assert_state):
    theta0, experts = hand_experts
    # keep ceil(0.5 n) per tensor: τ_1 w [0, -2, 3, 0], τ_2 w [-3, 0, 2, 0]; b unchanged (one each)
    # w: signs [-, -, +, +]; mean [-3, -2, 2.5, 0]; scaled by 0.5
    result = methods.ties(theta0, experts, density=0.5, scaling=0.5, trim_scope="tensor")
    assert_state(result, {"w": [-1.5, -1.0, 1.25, 0.0], "b": [1.5, 2.0]})


def test_ties_per_model_trim(hand_experts, assert_state):
    theta0, experts = hand_experts
    # one threshold per expert over all 6 entries, top 3: τ_1 -> 1 (both ones kept), τ_2 -> 2
    # τ_1 w [1, -2, 3, 0] b [1, 0]; τ_2 w [-3, 0, 2, 0] b [0, 2]
    # w sums [-2, -2, 5, 0] -> [-, -, +, +]: [-3, -2, 2.5, 0]; b [1, 2]
    result = methods.ties(theta0, experts, density=0.5, scaling=1.0, trim_scope="model")
    assert_state(result, {"w": [-3.0, -2.0, 2.5, 0.0], "b": [2.0, 3.0]})


def test_ties_count_election(assert_state):
    # three experts on one entry: +1, +1, -5: count elects +, sum elects -
    base = {"x": torch.tensor([0.0])}
    experts = [{"x": torch.tensor([1.0])}, {"x": torch.tensor([1.0])}, {"x": torch.tensor([-5.0])}]
    assert_state(methods.ties(base, experts, density=1.0, sign_method="count"), {"x": [1.0]})
    assert_state(methods.ties(base, experts, density=1.0, sign_method="sum"), {"x": [-5.0]})
