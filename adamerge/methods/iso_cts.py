"""Iso-CTS, isotropic merging in common and task-specific subspaces (Marczak et al., "No Task
Left Behind", ICML 2025, arXiv 2502.04959).

Per 2-D weight matrix (``r = min(m, n)``, ``K`` tasks):

1. Sizes: ``k = ⌊f r⌋`` common directions, then rounded so the rest splits evenly,
   ``k ← r − round((r − k)/K)·K``; each task gets ``s = (r − k)/K`` directions.
2. Common subspace: the top-``k`` singular triplets of ``Δ = Σ_k τ_k``.
3. Task-specific subspaces: project each ``τ_k`` off the common left subspace,
   ``τ̃_k = (I − U_c U_cᵀ) τ_k``, and keep its top ``s`` triplets.
4. Stack all left vectors and all right vectors, orthogonalise each stack (nearest
   orthonormal columns, as in TSV-M), make the spectrum isotropic with the mean ``σ̄`` of all
   stacked singular values, and return ``α σ̄ U_⊥ V_⊥ᵀ``.

Defaults: common-space fraction ``f = 0.8`` (the paper's and its code's
``common_space_fraction``); ``α = 1.0`` — the paper selects ``α`` on held-out validation
data per setting (its code sweeps ``{0.1, …, 3.0}``), 1.0 is FusionBench's default; sweep
it when validation data exist. Every other tensor gets ``α × mean_k τ_k``, and embedding
tables are treated as matrices, as in the authors' code. Numerically-zero triplets are
dropped before the orthogonalisation (see :mod:`adamerge.methods.tsv`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from adamerge.io.checkpoints import WeightsSource
from adamerge.methods.base import METHODS, MergeResult, merge_matrices
from adamerge.methods.svd import nonzero, orthogonalize, top_components
from adamerge.core.scope import Experts, Patterns


def iso_cts_sizes(rank: int, num_tasks: int, common_fraction: float = 0.8) -> tuple[int, int]:
    """``(k, s)``: common directions and directions per task, ``k + K s = r`` (step 1)."""
    if not 0.0 <= common_fraction <= 1.0:
        raise ValueError(f"common_fraction must be in [0, 1], got {common_fraction}")
    common = int(rank * common_fraction)
    common = min(rank, max(0, rank - round((rank - common) / num_tasks) * num_tasks))
    return common, (rank - common) // num_tasks


def iso_cts_components(taus: Tensor, common_fraction: float = 0.8) -> tuple[Tensor, Tensor, Tensor, int]:
    """Steps 1–3: the stacked ``U`` (``m × c``), ``σ`` (``c``), ``V`` (``n × c``) before
    orthogonalisation, common directions first, and how many of them are common."""
    num_tasks, m, n = taus.shape
    taus = taus.float()
    common, per_task = iso_cts_sizes(min(m, n), num_tasks, common_fraction)
    uc, sc, vc = nonzero(*top_components(taus.sum(dim=0), common), (m, n))
    specific = taus - uc @ (uc.T @ taus)
    ut, st, vt = top_components(specific, per_task)
    parts = [(uc, sc, vc)] + [nonzero(ut[k], st[k], vt[k], (m, n)) for k in range(num_tasks)]
    return (
        torch.cat([p[0] for p in parts], dim=1),
        torch.cat([p[1] for p in parts]),
        torch.cat([p[2] for p in parts], dim=1),
        sc.numel(),
    )


def iso_cts_delta(taus: Tensor, alpha: float = 1.0, common_fraction: float = 0.8) -> Tensor:
    """Iso-CTS's merged update ``α σ̄ U_⊥ V_⊥ᵀ`` for ``taus`` (``[K, m, n]``)."""
    u, s, v, _ = iso_cts_components(taus, common_fraction)
    if s.numel() == 0:
        return torch.zeros(taus.shape[1:], dtype=torch.float32, device=taus.device)
    return (alpha * s.mean()) * (orthogonalize(u) @ orthogonalize(v).T)


@METHODS.register("iso_cts")
def iso_cts(
    pretrained: WeightsSource,
    experts: Experts,
    alpha: float = 1.0,
    common_fraction: float = 0.8,
    include: Patterns = None,
    exclude: Patterns = None,
) -> MergeResult:
    """Iso-CTS: common + task-specific singular directions, orthogonalised, flat spectrum,
    times ``α``; non-matrix tensors get ``α × mean_k τ_k``."""
    return merge_matrices(pretrained, experts, lambda t: iso_cts_delta(t, alpha, common_fraction), alpha, include, exclude)
