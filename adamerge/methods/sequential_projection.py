"""OPCM: the experts folded in one at a time, each new update projected away from the merge so far.

Tang et al., 2025, "Merging Models on the Fly Without Retraining: A Sequential Approach to
Scalable Continual Model Merging" (arXiv 2501.09522), as its reference code (FusionBench's
``OPCMForCLIP``) computes it, with the experts in the order given (the reference shuffles them).
With ``S_1 = τ_1`` and, for each next expert ``t``, per weight matrix (every 2-D tensor of the
scope but embedding tables):

1. SVD of the running update, ``S_{t−1} = U Σ Vᵀ``; ``r`` = the number of leading components
   whose cumulative share of ``Σ σ_i`` is at most ``α`` (``r = min{i : Σ_{j≤i} σ_j / Σ σ > α}``,
   0-based).
2. ``P = Uᵀ τ_t V``; zero its whole diagonal and its top-left ``r × r`` block; ``P(τ_t) = U P Vᵀ``
   (with full ``U``, ``V``): ``τ_t`` less its components ``u_i v_iᵀ`` along ``S_{t−1}``'s own singular
   pairs and those between its top ``r`` directions. So ``⟨P(τ_t), S_{t−1}⟩ = 0``.
3. ``S_t = S_{t−1} + P(τ_t)``; every other tensor (biases, norms, embeddings) ``S_t = S_{t−1} + τ_t``.

The merged update keeps the average task-vector norm (the reference's ``λ_t`` rescaling after
every step, which leaves the direction of ``S_t`` unchanged, so it is applied once at the end):

    θ = θ_0 + n̄ · S_K / ‖S_K‖,    n̄ = mean_k ‖τ_k‖    (norms over the whole merge scope)

One expert gives its own ``τ_1``. A matrix whose running update is still zero takes ``τ_t`` whole
(nothing to be orthogonal to). Of the diagonal, only the pairs of nonzero singular values are
removed: the reference also zeroes those of a rank-deficient update's zero singular values, whose
vectors are an arbitrary basis of its null space (for a full-rank update the two agree). Paper default ``α = 0.5``. Data-free; the experts are read one at
a time, tensor by tensor, so memory is ``S`` and one tensor whatever ``K``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from adamerge.core.scope import Experts, Patterns
from adamerge.io.checkpoints import WeightsSource
from adamerge.methods.base import METHODS, MergeResult, apply_deltas, embedding_keys
from adamerge.methods.experts import ExpertReader


def project_out(update: Tensor, tau: Tensor, alpha: float) -> Tensor:
    """``P(τ)``: ``tau`` without its components along ``update``'s singular pairs ``u_i v_iᵀ`` (all ``i``)
    and between its top ``r`` directions (``u_i v_jᵀ``, ``i, j < r``), ``r`` set by ``alpha`` (step 1)."""
    if not update.any():
        return tau
    u, s, vh = torch.linalg.svd(update.float(), full_matrices=False)
    share = s.cumsum(0) / s.sum()
    r = int((share > alpha).float().argmax())
    coordinates = u.T @ tau @ vh.T  # P's top-left min(m, n) block: the only entries removed
    removed = torch.zeros_like(coordinates, dtype=torch.bool)
    removed[:r, :r] = True
    removed.diagonal().copy_(s > s[0] * max(update.shape) * torch.finfo(s.dtype).eps)  # pairs of S itself
    return tau - u @ (coordinates * removed) @ vh


@METHODS.register("sequential_projection")
def sequential_projection(
    pretrained: WeightsSource,
    experts: Experts,
    alpha: float = 0.5,
    include: Patterns = None,
    exclude: Patterns = None,
) -> MergeResult:
    """OPCM: ``θ_0 + n̄ S_K/‖S_K‖``, ``S_t = S_{t−1} + P(τ_t)`` per weight matrix (``τ_t`` projected away
    from ``S_{t−1}``'s singular directions), ``S_{t−1} + τ_t`` for the other tensors."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"sequential_projection: alpha must be in [0, 1], got {alpha}")
    reader = ExpertReader(pretrained, experts, include, exclude)
    embeddings = embedding_keys(pretrained, reader.keys)
    total: dict[str, Tensor] = {}
    norms = []
    for name in reader.names:
        squares = 0.0
        for key, tau in reader.task_vectors(name):
            squares += float(tau.square().sum())
            if key not in total:
                total[key] = tau
            elif tau.dim() == 2 and key not in embeddings:
                total[key] = total[key] + project_out(total[key], tau, alpha)
            else:
                total[key] = total[key] + tau
        norms.append(math.sqrt(squares))
    size = math.sqrt(sum(float(t.square().sum()) for t in total.values()))
    scale = sum(norms) / len(norms) / size if size > 0 else 0.0
    return apply_deltas(pretrained, {key: scale * t for key, t in total.items()})
