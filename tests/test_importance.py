"""Expert Merging++ chunk allocation from a recipe's ``coefficients.chunks``: by hand on small
tensors, ``m_ℓ = min(rows_ℓ, ⌊B · I_ℓ^κ / Σ_j I_j^κ⌋)`` with ``B = budget × (number of tensors)``
and ``I_ℓ ∝ Σ_k |c_k^ℓ| ‖τ_k^ℓ‖₁``; and every bad option refused by name."""

from __future__ import annotations

import pytest
import torch

from adamerge import MergeCoefficients, TaskVectors, build_layout
from adamerge.core.importance import resolve_chunks

SHAPES = {"w": (4, 3), "b": (4,), "v": (6, 2)}
BASE = {k: torch.zeros(s) for k, s in SHAPES.items()}
# ‖τ‖₁ per tensor and expert: w (6, 0), b (2, 2), v (0, 6)
EXPERTS = {
    "x": {"w": torch.full((4, 3), 0.5), "b": torch.tensor([1.0, -1.0, 0.0, 0.0]), "v": torch.zeros(6, 2)},
    "y": {"w": torch.zeros(4, 3), "b": torch.tensor([0.0, 0.0, 0.0, -2.0]), "v": torch.full((6, 2), -0.5)},
}
# stage-1 layer-wise coefficients, expert x then y: Σ_k |c_k| ‖τ_k‖₁ = w 0.5·6 = 3, b 0.5·2 + 0.25·2 = 1.5,
# v 0.25·6 = 1.5 (total 6): I = 0.5, 0.25, 0.25
STAGE1 = {"w": (0.5, 1.0), "b": (0.5, -0.25), "v": (0.0, -0.25)}


@pytest.fixture
def task_vectors():
    return TaskVectors.from_models(BASE, EXPERTS)


@pytest.fixture
def stage1(tmp_path):
    layout = build_layout(("x", "y"), SHAPES, "layer")
    init = torch.tensor([STAGE1[name] for name in layout.slot_names]).T
    path = tmp_path / "coefficients.safetensors"
    MergeCoefficients(layout, init=init).save(path)
    return path


@pytest.mark.parametrize("budget, kappa, expected", [
    (2, 1.0, {"w": 3, "b": 1, "v": 1}),  # B = 6: 6·0.5 = 3, 6·0.25 = 1.5 -> 1
    (4, 1.0, {"w": 4, "b": 3, "v": 3}),  # B = 12: w 6 capped at its 4 rows
    (2, 2.0, {"w": 4, "b": 1, "v": 1}),  # I² = .25, .0625, .0625 (sum .375): 6·.25/.375 = 4, 6·.0625/.375 = 1
    (1, 2.0, {"w": 2, "b": 0, "v": 0}),  # B = 3: 3·.25/.375 = 2, 0.5 -> 0 (frozen)
    (2, 0.0, {"w": 2, "b": 2, "v": 2}),  # κ = 0: an even share
])
def test_importance_allocation_by_hand(task_vectors, stage1, budget, kappa, expected):
    chunks = resolve_chunks({"importance_from": str(stage1), "budget": budget, "kappa": kappa}, task_vectors)
    assert chunks == expected


def test_allocated_chunks_lay_out_the_second_stage(task_vectors, stage1):
    chunks = resolve_chunks({"importance_from": str(stage1), "budget": 1, "kappa": 2}, task_vectors)
    layout = build_layout(("x", "y"), SHAPES, "chunk", chunks=chunks)
    assert layout.slot_names == ("w[0/2]", "w[1/2]", "b (frozen)", "v (frozen)")
    assert layout.frozen_slots == [2, 3]


def test_defaults_and_a_home_relative_path(task_vectors, stage1, monkeypatch):
    monkeypatch.setenv("HOME", str(stage1.parent))
    # budget 4, κ 1 by default: as (4, 1.0) above
    assert resolve_chunks({"importance_from": "~/coefficients.safetensors"}, task_vectors) == {"w": 4, "b": 3, "v": 3}


@pytest.mark.parametrize("chunks", [None, 3, {"w": 2, "b": 0}])
def test_an_explicit_chunk_map_passes_through(task_vectors, chunks):
    assert resolve_chunks(chunks, task_vectors) == chunks


@pytest.mark.parametrize("options, message", [
    ({"budgte": 2}, r"coefficients\.chunks: unknown importance option\(s\) \['budgte'\]; use budget, kappa"),
    ({"budget": 0}, r"coefficients\.chunks\.budget must be a number > 0, got 0"),
    ({"budget": "4"}, r"coefficients\.chunks\.budget must be a number > 0, got '4'"),
    ({"budget": True}, r"coefficients\.chunks\.budget must be a number > 0, got True"),
    ({"kappa": -1}, r"coefficients\.chunks\.kappa must be a number >= 0, got -1"),
    ({"budget": 0.1}, r"the chunk budget must be >= 1, got 0"),  # 0.1 × 3 tensors rounds down to no chunk
])
def test_bad_importance_options_are_named(task_vectors, stage1, options, message):
    with pytest.raises(ValueError, match=message):
        resolve_chunks({"importance_from": str(stage1), **options}, task_vectors)


def test_a_bad_importance_source_is_named(task_vectors, stage1, tmp_path):
    with pytest.raises(ValueError, match=r"coefficients\.chunks\.importance_from must be a coefficients file path, got 3"):
        resolve_chunks({"importance_from": 3}, task_vectors)
    with pytest.raises(FileNotFoundError, match="coefficients: no file .*missing.safetensors"):
        resolve_chunks({"importance_from": str(tmp_path / "missing.safetensors")}, task_vectors)
    more = TaskVectors.from_models({**BASE, "u": torch.zeros(2)}, {e: {**t, "u": torch.ones(2)} for e, t in EXPERTS.items()})
    with pytest.raises(KeyError, match="the stage-1 coefficients do not cover tensor 'u'"):
        resolve_chunks({"importance_from": str(stage1)}, more)
