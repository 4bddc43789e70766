"""Iso-C, isotropic merging in the common subspace (Marczak et al., "No Task Left Behind:
Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025, arXiv 2502.04959).

Per 2-D weight matrix: ``Δ = Σ_k τ_k = U S Vᵀ``; replace the spectrum by its mean,
``σ̄ = mean(S)``, and return ``α σ̄ U Vᵀ`` (a flat spectrum on the span of ``Δ``). Every other
tensor gets ``α × mean_k τ_k``, and embedding tables are treated as matrices, both as in
the authors' code (``src/utils/iso.py``: every 2-D tensor but CLIP's ``text_projection``).

Default ``α = 1.0``. The paper does not fix ``α``: it selects it per setting on held-out
validation data (the authors' code sweeps ``α ∈ {0.1, 0.2, …, 3.0}``); 1.0 is the value
FusionBench's port uses by default. A flat spectrum has a smaller Frobenius norm than
``Δ``'s, so the best ``α`` is usually above 1: sweep it when validation data exist.

The mean and the directions are taken over the non-zero rank of ``Δ`` (singular values
above ``σ_max · max(m, n) · eps``): for the full-rank ``Δ`` of real task vectors this is the
authors' computation exactly, and for a rank-deficient ``Δ`` it keeps the update inside
``Δ``'s span instead of spreading ``σ̄`` over arbitrary null-space directions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from adamerge.io.checkpoints import WeightsSource
from adamerge.methods.base import METHODS, MergeResult, merge_matrices
from adamerge.methods.svd import nonzero, top_components
from adamerge.core.scope import Experts, Patterns


def iso_c_delta(taus: Tensor, alpha: float = 1.0) -> Tensor:
    """Iso-C's merged update ``α σ̄ U Vᵀ`` of ``Δ = Σ_k τ_k`` for ``taus`` (``[K, m, n]``)."""
    delta = taus.float().sum(dim=0)
    u, s, v = nonzero(*top_components(delta), tuple(delta.shape))
    if s.numel() == 0:
        return torch.zeros_like(delta)
    return (alpha * s.mean()) * (u @ v.T)


@METHODS.register("iso_c")
def iso_c(
    pretrained: WeightsSource,
    experts: Experts,
    alpha: float = 1.0,
    include: Patterns = None,
    exclude: Patterns = None,
) -> MergeResult:
    """Iso-C: the summed task matrix with its spectrum flattened to its mean, times ``α``;
    non-matrix tensors get ``α × mean_k τ_k``."""
    return merge_matrices(pretrained, experts, lambda t: iso_c_delta(t, alpha), alpha, include, exclude)
