"""The SVD helpers the SVD-based methods share: a float32 SVD that does not converge is redone in float64."""

from __future__ import annotations

import torch

from adamerge.methods.svd import orthogonalize


def test_svd_falls_back_to_float64_where_float32_does_not_converge(monkeypatch):
    """LAPACK's float32 SVD fails to converge on some real task matrices (Iso-CTS on SmolLM2);
    the SVD helpers then redo it in float64 and return the same factorisation in float32."""
    from adamerge.methods import svd as svd_module

    real_svd = torch.linalg.svd

    def float32_fails(x, full_matrices=True):
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(x, full_matrices=full_matrices)

    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(torch.linalg, "svd", float32_fails)
    u, s, v = svd_module.top_components(x)
    polar = orthogonalize(x)
    assert u.dtype == s.dtype == v.dtype == polar.dtype == torch.float32
    torch.testing.assert_close(svd_module.recombine(u, s, v), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(polar.T @ polar, torch.eye(4), atol=1e-5, rtol=0)
