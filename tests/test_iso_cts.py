"""Iso-CTS against its definition (float64 references, never the package's helpers): the common
subspace of Σ τ_k, each task's own direction off it, a flat spectrum."""

from __future__ import annotations

import pytest
import torch

from adamerge.methods import iso_cts_components, iso_cts_delta, iso_cts_sizes
from adamerge.methods.svd import orthogonalize


def test_iso_cts_sizes():
    assert iso_cts_sizes(10, 2, 0.8) == (8, 1)
    assert iso_cts_sizes(10, 3, 0.8) == (7, 1)  # ⌊8⌋ = 8, the other 2 rounded to 3 = 3 × 1
    assert iso_cts_sizes(10, 1, 0.8) == (8, 2)
    assert iso_cts_sizes(384, 6, 0.8) == (306, 13)  # MiniLM: 307 → 306, 13 per task
    assert iso_cts_sizes(4, 8, 0.8) == (4, 0)  # more tasks than room: common space only
    with pytest.raises(ValueError, match="common_fraction"):
        iso_cts_sizes(10, 2, 1.5)


def test_iso_cts_common_and_task_specific_subspaces_and_flat_spectrum(ref):
    taus = ref.randn(3, 12, 10, seed=8)  # r = 10, K = 3: k = 7 common, 1 per task
    u, s, v, common = iso_cts_components(taus)
    assert common == 7 and u.shape == (12, 10) and v.shape == (10, 10)
    delta = taus.double().sum(0)
    ud, sd, _ = ref.svd64(delta)
    top = ud[:, :7]
    # the common part spans the top-7 left singular subspace of Σ τ_k ...
    ref.close(u[:, :7] @ u[:, :7].T, top @ top.T)
    # ... each task's direction is the top left singular vector of τ_k off that subspace
    off = torch.eye(12, dtype=torch.float64) - top @ top.T
    expected_s = [sd[:7]]
    for k in range(3):
        uk, sk, _ = ref.svd64(off @ taus[k].double())
        assert abs(float(uk[:, 0] @ u[:, 7 + k].double())) == pytest.approx(1.0, abs=1e-4)
        expected_s.append(sk[:1])
        ref.close(top.T @ u[:, 7 + k].double(), torch.zeros(7))
    # orthonormal left vectors after orthogonalisation; the common block is left as it is
    u_orth = orthogonalize(u)
    ref.close(u_orth.T @ u_orth, torch.eye(10))
    ref.close(u_orth[:, :7], u[:, :7])
    # flat spectrum: α times the mean of all the stacked singular values
    sigma_bar = torch.cat(expected_s).mean()
    merged = iso_cts_delta(taus, alpha=0.5)
    ref.close(torch.linalg.svdvals(merged.double()), torch.full((10,), 0.5 * sigma_bar.item()))
    ref.close(ref.column_projector(merged) @ top, top)  # the merged update contains the common subspace
