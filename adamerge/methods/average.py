"""Weight averaging: ``θ_0 + (1/K) Σ_k τ_k``, the mean of the experts' weights."""

from __future__ import annotations

from adamerge.io.checkpoints import WeightsSource
from adamerge.methods.base import METHODS, MergeResult, merge_each, task_vectors
from adamerge.core.scope import Experts, Patterns


@METHODS.register("average")
def average(
    pretrained: WeightsSource, experts: Experts, include: Patterns = None, exclude: Patterns = None
) -> MergeResult:
    """The experts' mean, ``θ_0 + (1/K) Σ_k τ_k``."""
    tv = task_vectors(pretrained, experts, include, exclude)
    return merge_each(pretrained, tv, lambda key, t: t.float().mean(dim=0))
