"""LiNeS by hand: each layer's scaling grows linearly with its depth, on state dicts and on a module with a tied head."""

from __future__ import annotations

import pytest
import torch

from adamerge import methods
from adamerge.methods import layer_depths


def test_lines_scales_with_depth(assert_state):
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


def test_lines_on_module_matches_hand_computation(shifted_tied_lm):
    model, experts = shifted_tied_lm([0.1, 0.3])  # Σ τ = 0.4 everywhere
    merged = methods.lines(model, experts, alpha=0.5, beta=1.0)
    # modules embedding, hidden (no numbered blocks): depths 1, 2 -> λ = 0.5, 1.5
    torch.testing.assert_close(merged.embedding.weight, model.embedding.weight + 0.2)
    torch.testing.assert_close(merged.hidden.weight, model.hidden.weight + 0.6)
    torch.testing.assert_close(merged.head.weight, merged.embedding.weight)
