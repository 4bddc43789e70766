"""DARE (Yu et al., ICML 2024, arXiv 2311.03099).

Drop each entry with probability ``1 − density`` and rescale by ``1/density``, then task
arithmetic (``θ_0 + λ Σ_k τ̃_k``) or, with ``sign_election=True``, the TIES elect + disjoint
mean (DARE-TIES, ``θ_0 + λ τ_m``).
"""

from __future__ import annotations

from adamerge.core import tensor_ops
from adamerge.io.checkpoints import WeightsSource
from adamerge.methods.base import METHODS, MergeResult, apply_deltas, task_vectors
from adamerge.core.scope import Experts, Patterns


@METHODS.register("dare")
def dare(
    pretrained: WeightsSource,
    experts: Experts,
    density: float = 0.5,
    scaling: float = 0.3,
    seed: int = 0,
    sign_election: bool = False,
    include: Patterns = None,
    exclude: Patterns = None,
) -> MergeResult:
    """DARE drop-and-rescale, then task arithmetic (or TIES election with ``sign_election``)."""
    tv = task_vectors(pretrained, experts, include, exclude).dare(density, seed)
    deltas = {}
    for key, t in tv.items():
        if sign_election:
            deltas[key] = scaling * tensor_ops.disjoint_mean(t, tensor_ops.elect_sign(t))
        else:
            deltas[key] = scaling * t.sum(dim=0)
    return apply_deltas(pretrained, deltas)
