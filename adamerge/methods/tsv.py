"""TSV-M, Task Singular Vectors merging (Gargiulo et al., CVPR 2025, arXiv 2412.00081).

Per 2-D weight matrix (``τ_k ∈ R^{m×n}``, ``r = min(m, n)``):

1. SVD of every task matrix, ``τ_k = U_k Σ_k V_kᵀ``; keep its top ``⌊r/K⌋`` components
   (the paper's ``1/K`` share of the rank per task).
2. Stack them: ``U = [U_1 … U_K]`` (``m × K⌊r/K⌋``), ``V = [V_1 … V_K]``, ``Σ`` the
   block-diagonal of the kept singular values.
3. Decorrelate (the paper's whitening): replace ``U`` and ``V`` by their nearest matrices
   with orthonormal columns, ``U_⊥ = P Qᵀ`` for ``U = P S Qᵀ`` (orthogonal Procrustes).
4. ``Δ = α U_⊥ Σ V_⊥ᵀ``.

Paper defaults: ``α = 1.0`` (TSV-M needs no tuned scale; the authors' code can also sweep
``α ∈ (0, 3]`` on validation). Every other tensor (biases, LayerNorm, any non-2-D tensor)
gets ``α × mean_k τ_k``, as in the authors' code (``compute_and_sum_svd_mem_reduction``).
Embedding tables are 2-D and go through steps 1–4 like any other matrix: the authors' code
decomposes every 2-D tensor (CLIP's ``positional_embedding`` included) and only averages
CLIP's ``text_projection``, which a vision-tower scope does not contain; exclude embeddings
from the scope to keep them pretrained instead.

Implementation notes: float32, whole matrices. Components whose singular value is
numerically zero (``τ_k`` of rank below ``⌊r/K⌋``) are dropped before the whitening: their
vectors are arbitrary null-space directions that would otherwise bend the others; for
full-rank task matrices this is the authors' computation exactly. With ``K > r`` no
component is kept and the matrix gets no update (as in the authors' code).
"""

from __future__ import annotations

import torch
from torch import Tensor

from adamerge.core.scope import Experts, Patterns
from adamerge.core.task_vectors import TaskVectors
from adamerge.io.checkpoints import WeightsSource
from adamerge.methods.base import METHODS, MergeResult, is_matrix, merge_matrices
from adamerge.methods.svd import nonzero, orthogonalize, recombine, top_components, whitened_merge


def tsv_components(taus: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Steps 1–2: the stacked ``U`` (``m × c``), ``σ`` (``c``) and ``V`` (``n × c``), task by task,
    each task's top ``⌊r/K⌋`` components (``c ≤ K⌊r/K⌋`` after dropping numerical zeros)."""
    u, s, v, _ = _stacked_components(taus)
    return u, s, v


def _stacked_components(taus: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`tsv_components` and the task each component came from. One task's SVD at a time: its
    kept ``1/K`` of the components are copied out before the next, so the full ``U`` of only one
    task matrix is alive (a batched SVD would hold all ``K``: as much again as the stack)."""
    num_tasks, m, n = taus.shape
    parts = [nonzero(*top_components(tau, min(m, n) // num_tasks), (m, n)) for tau in taus]
    owner = torch.cat([torch.full((len(p[1]),), k) for k, p in enumerate(parts)])
    return (
        torch.cat([p[0] for p in parts], dim=1),
        torch.cat([p[1] for p in parts]),
        torch.cat([p[2] for p in parts], dim=1),
        owner,
    )


def tsv_split(taus: Tensor, alpha: float = 1.0) -> Tensor:
    """TSV-M's merged update split by task: ``[K, m, n]``, task ``k``'s whitened components
    ``α U_⊥[:, k] Σ_k V_⊥[:, k]ᵀ``; their sum is :func:`tsv_delta`."""
    u, s, v, owner = _stacked_components(taus)
    u, v = orthogonalize(u), orthogonalize(v)
    return alpha * torch.stack([recombine(u[:, owner == k], s[owner == k], v[:, owner == k]) for k in range(taus.shape[0])])


def tsv_task_vectors(tv: TaskVectors, alpha: float = 1.0) -> TaskVectors:
    """Task vectors whose plain sum is TSV-M's merge: each matrix split by :func:`tsv_split`, every
    other tensor ``α τ_k / K``. Coefficients learned on them start, at 1, from TSV-M, as
    AdaMerging++ (Yang et al., ICLR 2024) starts from TIES by learning on TIES-processed vectors."""
    split = {
        key: (tsv_split(t.float(), alpha) if is_matrix(t) else alpha * t.float() / tv.num_experts).to(tv.dtype)
        for key, t in tv.items()
    }
    return TaskVectors(split, tv.expert_names)


def tsv_delta(taus: Tensor, alpha: float = 1.0) -> Tensor:
    """TSV-M's merged update ``α U_⊥ Σ V_⊥ᵀ`` for stacked task matrices ``taus`` (``[K, m, n]``)."""
    return alpha * whitened_merge(*tsv_components(taus))


@METHODS.register("tsv")
def tsv(
    pretrained: WeightsSource,
    experts: Experts,
    alpha: float = 1.0,
    include: Patterns = None,
    exclude: Patterns = None,
) -> MergeResult:
    """TSV-M: per-task top-``⌊r/K⌋`` singular components, whitened, recombined, times ``α``;
    non-matrix tensors get ``α × mean_k τ_k``."""
    return merge_matrices(pretrained, experts, lambda t: tsv_delta(t, alpha), alpha, include, exclude)
