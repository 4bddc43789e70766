"""Averaging: the plain mean of the experts, by hand."""

from __future__ import annotations

from adamerge import methods


def test_average(hand_experts, assert_state):
    theta0, experts = hand_experts
    assert_state(methods.average(theta0, experts), {"w": [-1.0, -0.5, 2.5, 0.0], "b": [1.5, 2.0]})
