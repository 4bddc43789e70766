"""The experts read one at a time, for merges that go through them in turn.

RegMean, Fisher merging and OPCM (``sequential_projection``) need each expert whole (to run it,
or to fold it into a running merge) rather than one tensor of every expert at a time
(:class:`~adamerge.core.task_vector_stream.TaskVectorStream`). :class:`ExpertReader` gives one
expert's task vectors over the asked keys, read and checked as task vectors are, so such a merge
holds one expert and its own running sums, never ``K`` experts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from adamerge.core.scope import Experts, Patterns, check_finite, expert_tensors
from adamerge.core.task_vectors import open_experts
from adamerge.io.checkpoints import WeightsSource


class ExpertReader:
    """The merge scope over ``pretrained`` and each expert's ``τ_k = θ_k − θ_0`` (float32), read
    from that expert alone when asked (LoRA adapters as their ``ΔW``)."""

    def __init__(self, pretrained: WeightsSource, experts: Experts, include: Patterns = None, exclude: Patterns = None):
        opened = open_experts(pretrained, experts, include, exclude, low_rank=False)
        self.base, self.keys, self._sources, self._deltas = opened.base, opened.keys, opened.named, opened.deltas
        self._pretrained, self._include, self._exclude = pretrained, include, exclude
        check_finite(self.base, self.keys, "the pretrained model")

    @property
    def names(self) -> tuple[str, ...]:
        """The experts' names, in the order they were given."""
        return tuple(self._sources)

    def task_vectors(self, name: str, keys: Sequence[str] | None = None) -> Iterator[tuple[str, Tensor]]:
        """Expert ``name``'s ``(key, τ)`` over ``keys`` (default: the scope), one tensor at a time."""
        source = self._sources[name]
        keys = self.keys if keys is None else keys
        for key, tensor in expert_tensors(name, source, self._pretrained, self.base, keys, self._include, self._exclude):
            if name in self._deltas:
                yield key, source.delta(key).float()
            else:
                yield key, tensor.to(torch.float32) - self.base[key].to(torch.float32)
