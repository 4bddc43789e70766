"""Data-free merges with fixed coefficients: averaging, task arithmetic, TIES, DARE, LiNeS.

Every method computes a merged task vector per tensor and returns ``θ_0 + merged``:
an ``nn.Module`` (a merged copy) when ``pretrained`` is a module, else a state dict.
Tensors outside the merge scope keep their pretrained values.

Definitions (``τ_k = θ_k − θ_0``, experts on dim 0):

- ``average``:          ``θ_0 + (1/K) Σ_k τ_k`` (the mean of the experts' weights).
- ``task_arithmetic``:  ``θ_0 + Σ_k λ_k τ_k`` (Ilharco et al., 2023), ``λ_k`` a scalar or one per expert.
- ``ties``:             trim each ``τ_k`` to its top-``density`` magnitudes (over the whole model by
  default), elect the sign with the larger total mass per entry, average the agreeing entries
  (divide by their count, as in the paper and PEFT; mergekit divides by the agreeing experts'
  weights) and add ``λ ×`` that (Yadav et al., 2023).
- ``dare``:             drop each entry with probability ``1 − density`` and rescale by
  ``1/density`` (Yu et al., 2024), then task arithmetic (``θ_0 + λ Σ_k τ̃_k``) or, with
  ``sign_election=True``, the TIES elect + disjoint mean (DARE-TIES, ``θ_0 + λ τ_m``).
- ``lines``:            ``θ_0 + λ(ℓ) Σ_k τ_k`` with ``λ(ℓ) = α + β (ℓ − 1)/(L − 1)`` rising
  linearly with depth ``ℓ`` of the tensor's block (Wang et al., 2025); tensors before the
  first block count as depth 1, after the last as depth ``L``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from adamerge import tensor_ops
from adamerge.checkpoints import WeightsSource, open_weights
from adamerge.coefficients import block_of, module_of
from adamerge.task_vectors import Experts, Patterns, TaskVectors, TrimScope, parameter_aliases

MergeResult = nn.Module | dict[str, Tensor]
MERGE_METHODS: dict[str, Callable[..., MergeResult]] = {}


def register_method(name: str):
    """Register a data-free merge under ``name`` (used by ``adamerge merge`` recipes)."""

    def decorate(fn):
        MERGE_METHODS[name] = fn
        return fn

    return decorate


def get_method(name: str) -> Callable[..., MergeResult]:
    if name not in MERGE_METHODS:
        raise KeyError(f"unknown merge method {name!r}; known: {sorted(MERGE_METHODS)}")
    return MERGE_METHODS[name]


def apply_deltas(pretrained: WeightsSource, deltas: Mapping[str, Tensor]) -> MergeResult:
    """``θ_0 + delta`` for every tensor in ``deltas``; a merged module copy or a state dict."""
    base = open_weights(pretrained)
    state = {name: base[name] for name in base}
    for key, delta in deltas.items():
        state[key] = (base[key].float() + delta.float().to(base[key].device)).to(base[key].dtype)
    if not isinstance(pretrained, nn.Module):
        return state
    for alias, canonical in parameter_aliases(pretrained).items():
        if canonical in deltas:
            state[alias] = state[canonical]
    merged = copy.deepcopy(pretrained)
    merged.load_state_dict(state)
    return merged


def _vectors(pretrained, experts, include, exclude) -> TaskVectors:
    return TaskVectors.from_models(pretrained, experts, include=include, exclude=exclude)


def _per_expert(scaling: float | Sequence[float], tv: TaskVectors) -> Tensor:
    if isinstance(scaling, (int, float)):
        return torch.full((tv.num_experts,), float(scaling))
    values = torch.tensor([float(s) for s in scaling])
    if values.numel() != tv.num_experts:
        raise ValueError(f"scaling has {values.numel()} values but there are {tv.num_experts} experts")
    return values


@register_method("task_arithmetic")
def task_arithmetic(
    pretrained: WeightsSource,
    experts: Experts,
    scaling: float | Sequence[float] = 0.3,
    include: Patterns = None,
    exclude: Patterns = None,
) -> MergeResult:
    """``θ_0 + Σ_k λ_k τ_k``."""
    tv = _vectors(pretrained, experts, include, exclude)
    weights = _per_expert(scaling, tv)
    return apply_deltas(pretrained, {k: torch.tensordot(weights, t.float(), dims=1) for k, t in tv.items()})


@register_method("average")
def average(
    pretrained: WeightsSource, experts: Experts, include: Patterns = None, exclude: Patterns = None
) -> MergeResult:
    """The experts' mean, ``θ_0 + (1/K) Σ_k τ_k``."""
    tv = _vectors(pretrained, experts, include, exclude)
    return apply_deltas(pretrained, {k: t.float().mean(dim=0) for k, t in tv.items()})


@register_method("ties")
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
    tv = _vectors(pretrained, experts, include, exclude).trim(density, trim_scope)
    deltas = {}
    for key, t in tv.items():
        sign = tensor_ops.elect_sign(t, sign_method)
        deltas[key] = scaling * tensor_ops.disjoint_mean(t, sign)
    return apply_deltas(pretrained, deltas)


@register_method("dare")
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
    tv = _vectors(pretrained, experts, include, exclude).dare(density, seed)
    deltas = {}
    for key, t in tv.items():
        if sign_election:
            deltas[key] = scaling * tensor_ops.disjoint_mean(t, tensor_ops.elect_sign(t))
        else:
            deltas[key] = scaling * t.sum(dim=0)
    return apply_deltas(pretrained, deltas)


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


@register_method("lines")
def lines(
    pretrained: WeightsSource,
    experts: Experts,
    alpha: float | None = None,
    beta: float | None = None,
    include: Patterns = None,
    exclude: Patterns = None,
) -> MergeResult:
    """LiNeS: the summed task vector scaled by ``α + β (ℓ−1)/(L−1)``; ``α`` and ``β`` default to ``1/K``."""
    tv = _vectors(pretrained, experts, include, exclude)
    alpha = 1.0 / tv.num_experts if alpha is None else alpha
    beta = 1.0 / tv.num_experts if beta is None else beta
    depths = layer_depths(tv.keys)
    deepest = max(depths.values())
    deltas = {}
    for key, t in tv.items():
        fraction = (depths[key] - 1) / (deepest - 1) if deepest > 1 else 0.0
        deltas[key] = (alpha + beta * fraction) * t.float().sum(dim=0)
    return apply_deltas(pretrained, deltas)
