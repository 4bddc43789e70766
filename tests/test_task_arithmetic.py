"""Task arithmetic by hand: θ_0 + λ Σ_k τ_k with one scaling or one per expert, tensors outside the scope kept."""

from __future__ import annotations

import pytest

from adamerge import methods


def test_task_arithmetic_scalar_and_per_expert(hand_experts, assert_state):
    theta0, experts = hand_experts
    assert_state(methods.task_arithmetic(theta0, experts, scaling=0.5), {"w": [-1.0, -0.5, 2.5, 0.0], "b": [1.5, 2.0]})
    assert_state(
        methods.task_arithmetic(theta0, experts, scaling=[1.0, 0.5]), {"w": [-0.5, -1.5, 4.0, 0.0], "b": [2.0, 2.0]}
    )
    assert_state(methods.task_arithmetic(theta0, experts, scaling=0.0), {"w": [0.0] * 4, "b": [1.0, 1.0]})
    with pytest.raises(ValueError, match="scaling has 3 values but there are 2 experts"):
        methods.task_arithmetic(theta0, experts, scaling=[1.0, 0.5, 0.1])


def test_task_arithmetic_scope_keeps_the_rest(hand_experts, assert_state):
    theta0, experts = hand_experts
    assert_state(methods.task_arithmetic(theta0, experts, scaling=1.0, include="b"), {"w": [0.0] * 4, "b": [2.0, 3.0]})
