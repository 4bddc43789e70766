"""Iso-C against its definition (float64 references, never the package's helpers): α times the mean
singular value of Σ τ_k on the singular vectors of Σ τ_k, over its nonzero rank only."""

from __future__ import annotations

import torch

from adamerge.methods import iso_c_delta


def test_iso_c_is_alpha_mean_sigma_times_the_polar_factor_of_the_sum(ref):
    taus = ref.randn(3, 7, 5, seed=0)
    delta = taus.double().sum(0)
    u, s, v = ref.svd64(delta)
    merged = iso_c_delta(taus, alpha=0.7)
    # flat spectrum: every singular value is α · mean σ(Σ τ_k)
    ref.close(torch.linalg.svdvals(merged.double()), torch.full((5,), 0.7 * s.mean().item()))
    # same singular subspaces, same pairing: merged = α σ̄ U Vᵀ
    ref.close(merged, 0.7 * s.mean() * u @ v.T)
    ref.close(ref.column_projector(merged), u @ u.T)


def test_iso_c_spreads_the_mean_over_the_nonzero_rank_only(ref):
    # two rank-1 task matrices: Σ τ_k has rank 2 in a 6 × 5 matrix
    a, b = ref.randn(6, 2, seed=1), ref.randn(5, 2, seed=2)
    taus = torch.stack([torch.outer(a[:, 0], b[:, 0]), torch.outer(a[:, 1], b[:, 1])])
    delta = taus.double().sum(0)
    _, s, _ = ref.svd64(delta)
    merged = iso_c_delta(taus, alpha=2.0)
    sigma = torch.linalg.svdvals(merged.double())
    ref.close(sigma[:2], torch.full((2,), 2.0 * s[:2].mean().item()))  # the mean of the 2 non-zero σ
    ref.close(sigma[2:], torch.zeros(3))  # nothing outside the span of Σ τ_k
    ref.close(ref.column_projector(merged), ref.column_projector(delta))  # left subspace
    ref.close(ref.column_projector(merged.T), ref.column_projector(delta.T))  # right subspace
