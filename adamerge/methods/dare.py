"""DARE (Yu et al., ICML 2024, arXiv 2311.03099).

Drop each entry with probability ``1 − density`` and rescale by ``1/density``, then task
arithmetic (``θ_0 + λ Σ_k τ̃_k``) or, with ``sign_election=True``, the TIES elect + disjoint
mean (DARE-TIES, ``θ_0 + λ τ_m``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from adamerge.core import tensor_ops
from adamerge.io.checkpoints import WeightsSource
from adamerge.methods.base import METHODS, MergeResult, merge_each, task_vectors
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
    generator = torch.Generator().manual_seed(seed)  # one stream over the scope's keys in order

    def rule(key: str, t: Tensor) -> Tensor:
        t = tensor_ops.dare(t, density, generator)
        if sign_election:
            return scaling * tensor_ops.disjoint_mean(t, tensor_ops.elect_sign(t))
        return scaling * t.sum(dim=0)

    return merge_each(pretrained, task_vectors(pretrained, experts, include, exclude), rule)
