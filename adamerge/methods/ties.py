"""TIES-Merging (Yadav et al., NeurIPS 2023, arXiv 2306.01708).

Trim each ``τ_k`` to its top-``density`` magnitudes (over the whole model by default), elect
the sign with the larger total mass per entry, average the agreeing entries (divide by their
count, as in the paper and PEFT; mergekit divides by the agreeing experts' weights) and add
``λ ×`` that.
"""

from __future__ import annotations

from adamerge.core import tensor_ops
from adamerge.io.checkpoints import WeightsSource
from adamerge.methods.base import METHODS, MergeResult, apply_deltas, task_vectors
from adamerge.core.scope import Experts, Patterns
from adamerge.core.task_vectors import TrimScope


@METHODS.register("ties")
def ties(
    pretrained: WeightsSource,
    experts: Experts,
    density: float = 0.2,
    scaling: float = 1.0,
    trim_scope: TrimScope = "model",
    sign_method: tensor_ops.SignMethod = "sum",
    include: Patterns = None,
    exclude: Patterns = None,
) -> MergeResult:
    """TIES-Merging: trim, elect sign, disjoint mean, scale by ``λ``."""
    tv = task_vectors(pretrained, experts, include, exclude).trim(density, trim_scope)
    deltas = {}
    for key, t in tv.items():
        sign = tensor_ops.elect_sign(t, sign_method)
        deltas[key] = scaling * tensor_ops.disjoint_mean(t, sign)
    return apply_deltas(pretrained, deltas)
