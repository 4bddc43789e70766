"""The method registry and what every data-free merge shares.

A method computes one merged task vector per tensor of the merge scope and returns
``θ_0 + merged``: an ``nn.Module`` (a merged copy) when ``pretrained`` is a module, else a state
dict. Tensors outside the scope, and in-scope tensors a method leaves out, keep their pretrained
values. :func:`merge_each` is the shared path: it reads one tensor of the ``K`` experts
(:class:`~adamerge.core.task_vector_stream.TaskVectorStream`), hands it to the method's rule and
writes the result before reading the next, so a merge holds ``K`` tensors and the merged model,
never ``K`` models of task vectors.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor, nn

from adamerge.io.checkpoints import WeightsSource, open_weights
from adamerge.io.terminal import progress
from adamerge.core.registry import Registry
from adamerge.core.scope import Experts, Patterns
from adamerge.core.task_vector_stream import TaskVectorStream
from adamerge.core.task_vectors import TaskVectors

MergeResult = nn.Module | dict[str, Tensor]
METHODS: Registry[Callable[..., MergeResult]] = Registry("merge method")
"""The data-free merges by name (a recipe's ``method.name``); ``@METHODS.register("name")`` adds one."""


class MergedWeights:
    """``θ_0``, then ``θ_0 + delta`` written key by key: ``result`` is a copy of ``pretrained`` when
    it is a module (tied aliases follow their canonical tensor), else a state dict."""

    def __init__(self, pretrained: WeightsSource):
        self.base = open_weights(pretrained)
        if isinstance(pretrained, nn.Module):
            self.result: MergeResult = copy.deepcopy(pretrained)
            self._targets = self.result.state_dict()  # views of the copy's tensors
        else:
            self.result = {name: self.base[name] for name in self.base}
            self._targets = None

    def add(self, key: str, delta: Tensor) -> None:
        reference = self.base[key]
        value = (reference.float() + delta.float().to(reference.device)).to(reference.dtype)
        if self._targets is None:
            self.result[key] = value
        else:
            self._targets[key].copy_(value)


def apply_deltas(pretrained: WeightsSource, deltas: Mapping[str, Tensor]) -> MergeResult:
    """``θ_0 + delta`` for every tensor in ``deltas``; a merged module copy or a state dict."""
    merged = MergedWeights(pretrained)
    for key, delta in deltas.items():
        merged.add(key, delta)
    return merged.result


_DEVICE: ContextVar[torch.device | None] = ContextVar("merge_device", default=None)


@contextmanager
def merging_on(device: torch.device | str) -> Iterator[None]:
    """Data-free merges run inside compute on ``device``: each key's ``K`` task vectors are read on
    the host, moved there, merged (SVDs, WUDI's solve, TIES' election) and the update moved back
    into the host's merged model before the next key is read. The runner sets the recipe's device."""
    token = _DEVICE.set(torch.device(device))
    try:
        yield
    finally:
        _DEVICE.reset(token)


def _moved(taus: Tensor, device: torch.device | None) -> Tensor:
    return taus if device is None else taus.to(device, non_blocking=True)


def merge_each(
    pretrained: WeightsSource, tv: TaskVectorStream, rule: Callable[[str, Tensor], Tensor | None],
    desc: str = "merging tensors",
) -> MergeResult:
    """``θ_0 + rule(key, τ)`` for every key of the scope, ``τ`` its ``[K, *shape]`` task vectors,
    read and merged one key at a time (on :func:`merging_on`'s device); a key whose rule gives
    ``None`` keeps ``θ_0``."""
    merged = MergedWeights(pretrained)
    device = _DEVICE.get()
    for key in progress(tv.keys, desc, total=len(tv), unit="tensor"):
        delta = rule(key, _moved(tv[key], device))  # no name holds the stack past its key
        if delta is not None:
            merged.add(key, delta)
    return merged.result


START = "start"
"""The name of the data-free merge's update among the vectors of :func:`with_start`."""

PER_TENSOR_METHODS = frozenset({"average", "task_arithmetic", "tsv", "iso_c", "iso_cts", "wudi", "ties"})
"""Methods whose update of a tensor depends on that tensor's task vectors alone, so a merge of any
part of the model (one block, when learning progressively) is exactly that part of the whole
merge. TIES only with ``trim_scope: tensor`` (its default trims over the whole model); LiNeS
scales by depth over the scope and DARE draws one random stream over every key in order."""


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
    vectors = {}
    for key in tv.keys:
        update = state[key].float() - base[key].float().to(state[key].device)
        vectors[key] = torch.cat([update.to(device=tv[key].device, dtype=tv.dtype)[None], tv[key]])
    return TaskVectors(vectors, (START, *tv.expert_names))


def task_vectors(pretrained: WeightsSource, experts: Experts, include: Patterns, exclude: Patterns) -> TaskVectorStream:
    """The experts' task vectors over the scope, read key by key (for :func:`merge_each`)."""
    return TaskVectorStream(pretrained, experts, include, exclude)


def per_expert(scaling: float | Sequence[float], tv: TaskVectorStream) -> Tensor:
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
    return merge_each(pretrained, tv, lambda key, t: matrix_delta(t) if is_matrix(t) else alpha * t.float().mean(dim=0))
