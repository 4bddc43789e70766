"""The method registry and what every data-free merge shares.

A method computes one merged task vector per tensor of the merge scope and returns
``θ_0 + merged`` through :func:`apply_deltas`: an ``nn.Module`` (a merged copy) when
``pretrained`` is a module, else a state dict. Tensors outside the scope, and in-scope
tensors a method leaves out of its deltas, keep their pretrained values.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from adamerge.io.checkpoints import WeightsSource, open_weights
from adamerge.io.terminal import progress
from adamerge.core.registry import Registry
from adamerge.core.scope import Experts, Patterns, parameter_aliases
from adamerge.core.task_vectors import TaskVectors

MergeResult = nn.Module | dict[str, Tensor]
METHODS: Registry[Callable[..., MergeResult]] = Registry("merge method")
"""The data-free merges by name (a recipe's ``method.name``); ``@METHODS.register("name")`` adds one."""


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


START = "start"
"""The name of the data-free merge's update among the vectors of :func:`with_start`."""


def with_start(tv: TaskVectors, pretrained: WeightsSource, experts: Experts, method: str, args: Mapping,
               include: Patterns = None, exclude: Patterns = None) -> TaskVectors:
    """``tv`` with one more vector first, named ``start``: a data-free merge's whole update
    ``Δ = θ_method − θ_0``. Its coefficient at 1 and the experts' at 0 is that merge exactly, so a
    learned merge starts from any data-free method (WUDI, TSV-M, ...) and learns per-task
    corrections on top, where its own update cannot be split by task."""
    if START in tv.expert_names:
        raise ValueError(f"an expert is named {START!r}, the name of the start vector: rename the expert")
    merged = METHODS.get(method)(pretrained, experts, include=include, exclude=exclude, **args)
    state, base = open_weights(merged), open_weights(pretrained)
    vectors = {key: torch.cat([(state[key].float() - base[key].float()).to(tv.dtype)[None], tv[key]]) for key in tv.keys}
    return TaskVectors(vectors, (START, *tv.expert_names))


def task_vectors(pretrained: WeightsSource, experts: Experts, include: Patterns, exclude: Patterns) -> TaskVectors:
    return TaskVectors.from_models(pretrained, experts, include=include, exclude=exclude)


def per_expert(scaling: float | Sequence[float], tv: TaskVectors) -> Tensor:
    """A scalar or one value per expert, as a ``[K]`` tensor."""
    if isinstance(scaling, (int, float)):
        return torch.full((tv.num_experts,), float(scaling))
    values = torch.tensor([float(s) for s in scaling])
    if values.numel() != tv.num_experts:
        raise ValueError(f"scaling has {values.numel()} values but there are {tv.num_experts} experts")
    return values


def is_matrix(stacked: Tensor) -> bool:
    """Whether a stacked task vector ``[K, *shape]`` is one of 2-D weight matrices."""
    return stacked.dim() == 3


# names of embedding tables when only a state dict (no module types) is at hand:
# BERT/RoBERTa ``embeddings.*``, LLaMA ``embed_tokens``, CLIP ``positional_embedding``, GPT-2 ``wte``/``wpe``
EMBEDDING_NAME = re.compile(r"embed|(^|\.)(wte|wpe)\.")


def embedding_keys(pretrained: WeightsSource, keys: Iterable[str]) -> set[str]:
    """The keys that are embedding tables: weights of ``nn.Embedding`` modules (tied aliases
    included) when ``pretrained`` is a module, else keys whose name matches ``EMBEDDING_NAME``."""
    keys = list(keys)
    if isinstance(pretrained, nn.Module):
        tables = {id(m.weight) for m in pretrained.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
        names = {n for n, p in pretrained.named_parameters(remove_duplicate=False) if id(p) in tables}
        return {k for k in keys if k in names}
    return {k for k in keys if EMBEDDING_NAME.search(k)}


def merge_matrices(
    pretrained: WeightsSource, experts: Experts, matrix_delta: Callable[[Tensor], Tensor], alpha: float,
    include: Patterns, exclude: Patterns,
) -> MergeResult:
    """The SVD methods' shared rule: ``matrix_delta(τ)`` for every 2-D weight, ``α × mean_k τ_k``
    for every other tensor (biases, norms), as TSV-M's and Iso-C's code do."""
    tv = task_vectors(pretrained, experts, include, exclude)
    deltas = {key: matrix_delta(t) if is_matrix(t) else alpha * t.float().mean(dim=0)
              for key, t in progress(tv.items(), "merging tensors", total=len(tv), unit="tensor")}
    return apply_deltas(pretrained, deltas)
