"""TIES-Merging (Yadav et al., NeurIPS 2023, arXiv 2306.01708).

Trim each ``τ_k`` to its top-``density`` magnitudes (over the whole model by default), elect
the sign with the larger total mass per entry, average the agreeing entries (divide by their
count, as in the paper and PEFT; mergekit divides by the agreeing experts' weights) and add
``λ ×`` that. The model-wide trim finds each expert's threshold in two reading passes over the
experts before the merging one (:meth:`~adamerge.core.task_vector_stream.TaskVectorStream.magnitude_thresholds`).
"""

from __future__ import annotations

from torch import Tensor

from adamerge.core import tensor_ops
from adamerge.io.checkpoints import WeightsSource
from adamerge.methods.base import METHODS, MergeResult, merge_each, task_vectors
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
    if trim_scope not in ("tensor", "model"):
        raise ValueError(f"unknown trim scope {trim_scope!r}; use 'tensor' or 'model'")
    tv = task_vectors(pretrained, experts, include, exclude)
    thresholds = tv.magnitude_thresholds(density) if trim_scope == "model" else None

    def rule(key: str, t: Tensor) -> Tensor:
        if thresholds is None:
            t = tensor_ops.trim(t, density)
        else:
            t = tensor_ops.trim_below(t, thresholds.to(t.device))
        return scaling * tensor_ops.disjoint_mean(t, tensor_ops.elect_sign(t, sign_method))

    return merge_each(pretrained, tv, rule)
