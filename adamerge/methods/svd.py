"""SVD helpers shared by TSV-M, Iso-C and Iso-CTS (float32, whole matrices).

Conventions: a matrix is ``m × n``; ``u`` has the left singular vectors as columns
(``m × k``), ``v`` the right ones as columns (``n × k``), so ``x ≈ u diag(s) vᵀ``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD in float32; where LAPACK's float32 solver fails to converge (it does on some
    ill-conditioned task matrices of real LLMs, e.g. Iso-CTS on SmolLM2), the same SVD in float64,
    returned in float32."""
    try:
        return torch.linalg.svd(x.float(), full_matrices=False)
    except torch.linalg.LinAlgError:
        return tuple(t.float() for t in torch.linalg.svd(x.double(), full_matrices=False))


def rank_tolerance(s: Tensor, shape: tuple[int, int]) -> Tensor:
    """Singular values at or below this count as zero (``σ_max · max(m, n) · eps``, as ``matrix_rank``)."""
    return s.amax(dim=-1, keepdim=True) * max(shape) * torch.finfo(s.dtype).eps


def top_components(x: Tensor, k: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The top-``k`` singular triplets ``(u, s, v)`` of ``x`` (``[..., m, n]``, batched over the leading dims).

    ``k = None`` keeps all ``min(m, n)``.
    """
    u, s, vh = svd(x)
    k = s.shape[-1] if k is None else k
    return u[..., :k], s[..., :k], vh[..., :k, :].transpose(-2, -1)


def nonzero(u: Tensor, s: Tensor, v: Tensor, shape: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Drop the triplets whose singular value is numerically zero (their vectors are arbitrary)."""
    if s.numel() == 0:
        return u, s, v
    keep = s > rank_tolerance(s, shape).squeeze(-1)
    return u[:, keep], s[keep], v[:, keep]


def orthogonalize(x: Tensor) -> Tensor:
    """The matrix with orthonormal columns nearest to ``x`` in Frobenius norm (``m × c``, ``c ≤ m``).

    For ``x = P S Qᵀ`` (thin SVD) it is ``P Qᵀ``: the orthogonal Procrustes / polar factor, the
    "whitening" of TSV-M. Columns that are already orthonormal come back unchanged.
    """
    if x.shape[-1] == 0:
        return x.float()
    p, _, qh = svd(x)
    return p @ qh


def recombine(u: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """``u diag(s) vᵀ``."""
    return (u * s) @ v.transpose(-2, -1)


def whitened_merge(u: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """Orthogonalise stacked left and right vectors and recombine: ``U_⊥ diag(s) V_⊥ᵀ``."""
    return recombine(orthogonalize(u), s, orthogonalize(v))
