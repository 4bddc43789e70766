"""Task vectors read one tensor at a time: what a data-free merge needs.

A data-free merge computes each tensor's merged update from that tensor's ``K`` task vectors
alone, so it never needs :class:`~adamerge.core.task_vectors.TaskVectors` (every expert's every
tensor in float32: ``K`` models, 112 GB for a 7B with ``K = 4``). :class:`TaskVectorStream` reads
one key of the ``K`` experts when asked, with the same checks, values and warnings as
``TaskVectors.from_models``, unmapping each expert's safetensors file once its tensor is read,
so its memory is one key's ``[K, *shape]`` stack. TIES's trim over the whole model takes two
more passes (:meth:`TaskVectorStream.magnitude_thresholds`) instead of holding the model.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from adamerge.core.low_rank import LowRankStack
from adamerge.core.scope import Experts, Patterns, check_finite, check_tensor, expert_weights
from adamerge.core.task_vectors import check_factors, open_experts
from adamerge.core.tensor_ops import keep_count
from adamerge.io.checkpoints import WeightsSource

DIGITS = 1 << 16  # a float32's bits in two 16-bit halves: one histogram bin per value of a half


class TaskVectorStream:
    """``key -> τ`` (``[K, *shape]``, float32) over a merge scope, read from the ``K`` experts on
    each access (nothing is kept between keys): ``stream[key]`` equals ``TaskVectors.from_models(...)[key]``."""

    def __init__(self, pretrained: WeightsSource, experts: Experts, include: Patterns = None, exclude: Patterns = None):
        self.base, self.keys, named, self._deltas, self._factored = open_experts(pretrained, experts, include, exclude)
        self.expert_names = tuple(named)
        self._sources = named
        check_finite(self.base, self.keys, "the pretrained model")
        dense = [key for key in self.keys if key not in self._factored]
        self._weights = {
            name: expert_weights(name, source, pretrained, self.base, dense, include, exclude)
            for name, source in named.items()
        }
        self._changed = dict.fromkeys(named, False)
        self._unread = set(self.keys)

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, key: str) -> Tensor:
        """The ``K`` experts' ``τ`` of ``key``, read now."""
        taus = self._low_rank(key) if key in self._factored else self._dense(key)
        self._unread.discard(key)
        if not self._unread:
            self._warn_unchanged()
        return taus

    def _dense(self, key: str) -> Tensor:
        reference = self.base[key]
        taus = torch.empty((self.num_experts, *reference.shape), dtype=torch.float32)
        for index, (name, weights) in enumerate(self._weights.items()):
            taus[index] = self._difference(name, key, reference, taus.device)
            self._changed[name] = self._changed[name] or bool(taus[index].any())
            if hasattr(weights, "close"):
                weights.close()  # its tensor is gone: the file's pages leave this process before the next expert's
        return taus

    def _difference(self, name: str, key: str, reference: Tensor, device: torch.device) -> Tensor:
        """One expert's ``θ_k − θ_0`` of ``key`` in float32 (``ΔW`` for a LoRA adapter over the pretrained weights)."""
        tensor = self._weights[name][key]
        check_tensor(f"expert {name!r}", key, tensor, reference)
        if name in self._deltas:
            return self._sources[name].delta(key).to(device)
        tensor = tensor.to(reference.dtype)  # read in the pretrained model's dtype, as TaskVectors.from_models
        return tensor.to(device=device, dtype=torch.float32) - reference.to(device=device, dtype=torch.float32)

    def _low_rank(self, key: str) -> Tensor:
        pairs = []
        for name, source in self._sources.items():
            pair = source.low_rank(key)
            check_factors(name, key, pair)
            pairs.append(pair)
            self._changed[name] = self._changed[name] or (pair is not None and bool(pair[0].any()) and bool(pair[1].any()))
        return LowRankStack.from_factors(pairs, self.base[key].shape, torch.float32).dense()

    def _warn_unchanged(self) -> None:
        for name, changed in self._changed.items():
            if not changed:
                warnings.warn(
                    f"expert {name!r} is identical to the pretrained model over the merge scope: its task vector is zero",
                    stacklevel=3,
                )
        self._changed = dict.fromkeys(self._changed, True)  # said once

    def magnitude_thresholds(self, density: float) -> Tensor:
        """Per expert, the smallest magnitude among its top-``density`` entries over the whole
        scope: ``TaskVectors.model_thresholds`` exactly (``[K]``, float32), in two passes.

        A non-negative float32's bits, read as an integer, order like the float, so the ``c``-th
        largest magnitude is found digit by digit: a histogram of the upper 16 bits gives its bin
        and its rank inside it, a histogram of the lower 16 bits of that bin's entries the rest."""
        total = sum(math.prod(self.base[key].shape) for key in self.keys)
        rank = torch.full((self.num_experts,), keep_count(total, density), dtype=torch.int64)
        upper, rank = _select(self._histogram(lambda bits: bits >> 16, None), rank)
        lower, _ = _select(self._histogram(lambda bits: bits & (DIGITS - 1), upper), rank)
        return ((upper << 16) | lower).to(torch.int32).view(torch.float32)

    def _histogram(self, digit: Callable[[Tensor], Tensor], upper: Tensor | None) -> Tensor:
        """``[K, 2¹⁶]`` counts of ``digit(bits)`` of each expert's magnitudes over the scope, only
        of those whose upper half is ``upper[k]`` when given."""
        counts = torch.zeros((self.num_experts, DIGITS), dtype=torch.int64)
        for key in self.keys:
            _count_digits(counts, self[key], digit, upper)  # the key's stack is gone before the next is read
        return counts


def _count_digits(counts: Tensor, taus: Tensor, digit: Callable[[Tensor], Tensor], upper: Tensor | None) -> None:
    """Add each expert's histogram of one key to ``counts`` (see ``_histogram``)."""
    for k, tau in enumerate(taus):
        bits = tau.abs().flatten().view(torch.int32)
        bits = bits if upper is None else bits[(bits >> 16) == upper[k]]
        counts[k] += torch.bincount(digit(bits), minlength=DIGITS)


def _select(counts: Tensor, rank: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of ``counts`` (bins in increasing order), the bin holding the ``rank``-th largest
    entry (1-based) and that entry's rank among the bin's own entries."""
    at_or_above = counts.flip(1).cumsum(1).flip(1)
    chosen = (at_or_above >= rank[:, None]).sum(1) - 1
    above = at_or_above.gather(1, chosen[:, None]).squeeze(1) - counts.gather(1, chosen[:, None]).squeeze(1)
    return chosen, rank - above
