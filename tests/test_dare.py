"""DARE by hand: at full density task arithmetic (or TIES with sign election); dropped entries and rescaled survivors."""

from __future__ import annotations

import torch

from adamerge import methods


def test_dare_full_density_is_task_arithmetic_or_ties(hand_experts, assert_state):
    theta0, experts = hand_experts
    assert_state(methods.dare(theta0, experts, density=1.0, scaling=0.5), {"w": [-1.0, -0.5, 2.5, 0.0], "b": [1.5, 2.0]})
    assert_state(
        methods.dare(theta0, experts, density=1.0, scaling=0.5, sign_election=True),
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


def test_dare_sign_election_on_two_experts(assert_state):
    base = {"x": torch.zeros(4)}
    experts = [{"x": torch.tensor([2.0, -1.0, 4.0, 1.0])}, {"x": torch.tensor([-1.0, -3.0, 2.0, 0.0])}]
    # density 1: elect on sums [1, -4, 6, 1] -> [+, -, +, +]; mean of agreeing [2, -2, 3, 1]
    result = methods.dare(base, experts, density=1.0, scaling=1.0, sign_election=True)
    assert_state(result, {"x": [2.0, -2.0, 3.0, 1.0]})
