"""LiNeS (Wang et al., ICLR 2025): ``θ_0 + λ(ℓ) Σ_k τ_k`` with ``λ(ℓ) = α + β (ℓ − 1)/(L − 1)``.

The scale rises linearly with the depth ``ℓ`` of the tensor's block; tensors before the
first block count as depth 1, after the last as depth ``L``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from adamerge.io.checkpoints import WeightsSource
from adamerge.core.granularities import block_of, module_of
from adamerge.methods.base import METHODS, MergeResult, merge_each, task_vectors
from adamerge.core.scope import Experts, Patterns


def layer_depths(keys: Sequence[str]) -> dict[str, int]:
    """Depth ``ℓ`` (1-based) of each tensor: the index of its numbered block.

    Tensors before the first block get depth 1 and after the last get depth ``L``; with no
    numbered blocks at all, each module is its own layer, in order.
    """
    blocks = [block_of(k) for k in keys]
    if not any(blocks):
        modules = list(dict.fromkeys(module_of(k) for k in keys))
        return {k: modules.index(module_of(k)) + 1 for k in keys}
    order = list(dict.fromkeys(b for b in blocks if b))
    depths, seen_block = {}, False
    for key, block in zip(keys, blocks):
        if block:
            seen_block = True
            depths[key] = order.index(block) + 1
        else:
            depths[key] = len(order) if seen_block else 1
    return depths


@METHODS.register("lines")
def lines(
    pretrained: WeightsSource,
    experts: Experts,
    alpha: float | None = None,
    beta: float | None = None,
    include: Patterns = None,
    exclude: Patterns = None,
) -> MergeResult:
    """LiNeS: the summed task vector scaled by ``α + β (ℓ−1)/(L−1)``; ``α`` and ``β`` default to ``1/K``."""
    tv = task_vectors(pretrained, experts, include, exclude)
    alpha = 1.0 / tv.num_experts if alpha is None else alpha
    beta = 1.0 / tv.num_experts if beta is None else beta
    depths = layer_depths(tv.keys)
    deepest = max(depths.values())

    def rule(key: str, t: Tensor) -> Tensor:
        fraction = (depths[key] - 1) / (deepest - 1) if deepest > 1 else 0.0
        return (alpha + beta * fraction) * t.float().sum(dim=0)

    return merge_each(pretrained, tv, rule)
