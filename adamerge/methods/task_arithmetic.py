"""Task arithmetic (Ilharco et al., ICLR 2023): ``θ_0 + Σ_k λ_k τ_k``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adamerge.io.checkpoints import WeightsSource
from adamerge.methods.base import METHODS, MergeResult, merge_each, per_expert, task_vectors
from adamerge.core.scope import Experts, Patterns


@METHODS.register("task_arithmetic")
def task_arithmetic(
    pretrained: WeightsSource,
    experts: Experts,
    scaling: float | Sequence[float] = 0.3,
    include: Patterns = None,
    exclude: Patterns = None,
) -> MergeResult:
    """``θ_0 + Σ_k λ_k τ_k``; ``λ_k`` a scalar or one per expert."""
    tv = task_vectors(pretrained, experts, include, exclude)
    weights = per_expert(scaling, tv)
    return merge_each(pretrained, tv, lambda key, t: torch.tensordot(weights, t.float(), dims=1))
