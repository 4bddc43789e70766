"""Task vectors: what each expert changed, ``τ_k = θ_k − θ_0``, over a chosen merge scope.

Stored experts-first (``[K, *shape]`` per parameter) in a storage dtype of your choice,
so a merge is one weighted sum over dim 0 and TIES/DARE are per-expert transforms that
keep one vector per expert (which is what AdaMerging++ learns on). Matrices that only LoRA
experts changed stay as their factors (:class:`~adamerge.core.low_rank.LowRankStack`,
``Σ r_k (m + n)`` numbers instead of ``K m n``); indexing materialises them, the merged model
merges them factored.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from safetensors import safe_open
from torch import Tensor

from adamerge.core import tensor_ops
from adamerge.core.low_rank import LowRankStack
from adamerge.core.scope import Experts, Patterns, check_finite, expert_tensors, name_experts, scope_keys
from adamerge.io.checkpoints import WeightsSource, open_weights, save_safetensors
from adamerge.io.lora import LoraExpert, is_adapter, open_adapter

TrimScope = Literal["tensor", "model"]


class TaskVectors:
    """Per-expert task vectors over a merge scope: ``key -> Tensor[K, *shape]``.

    A value may be a :class:`LowRankStack` (LoRA experts' factors): ``tv[key]`` and ``items()``
    materialise it, ``tv.low_rank(key)`` gives the factors, ``shape``/``numel``/``nbytes`` read
    them without materialising."""

    def __init__(self, vectors: Mapping[str, Tensor | LowRankStack], expert_names: Sequence[str]):
        self.expert_names = tuple(expert_names)
        if len(set(self.expert_names)) != len(self.expert_names):
            raise ValueError(f"expert names must be unique, got {list(self.expert_names)}")
        if not vectors:
            raise ValueError("task vectors are empty: the merge scope matched no parameter")
        for key, tensor in vectors.items():
            if tensor.shape[0] != len(self.expert_names):
                raise ValueError(
                    f"task vector {key!r} has {tensor.shape[0]} experts on dim 0, expected {len(self.expert_names)}"
                )
        self._vectors = dict(vectors)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_models(
        cls,
        pretrained: WeightsSource,
        experts: Experts,
        include: Patterns = None,
        exclude: Patterns = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        low_rank: bool = True,
    ) -> "TaskVectors":
        """Compute ``τ_k = θ_k − θ_0`` for every expert over the merge scope.

        The default scope is every floating-point parameter of ``pretrained`` (all floating
        tensors when it is given as a file or state dict). Each expert is read once, one
        tensor at a time; differences are taken in float32 and stored in ``dtype``
        (float32 by default). When every expert is a LoRA adapter, the matrices none of them
        saves whole are kept as factors (``low_rank=False`` stores them dense). Bad input
        raises an error naming the expert and the key.
        """
        storage = _as_dtype(dtype) if dtype is not None else torch.float32
        base, keys, named, deltas, factored = open_experts(pretrained, experts, include, exclude, low_rank)
        dense_keys = [key for key in keys if key not in factored]
        vectors: dict[str, Tensor | LowRankStack] = {
            key: torch.empty((len(named), *base[key].shape), dtype=storage, device=device) for key in dense_keys
        }
        factors: dict[str, list] = {key: [] for key in factored}
        check_finite(base, keys, "the pretrained model")
        for index, (expert_name, source) in enumerate(named.items()):
            changed = False
            for key in factors:
                pair = source.low_rank(key)
                check_factors(expert_name, key, pair)
                factors[key].append(pair)
                changed = changed or (pair is not None and bool(pair[0].any()) and bool(pair[1].any()))
            for key, tensor in expert_tensors(expert_name, source, pretrained, base, dense_keys, include, exclude):
                if expert_name in deltas:
                    diff = source.delta(key).to(vectors[key].device)
                else:
                    diff = tensor.to(device=vectors[key].device, dtype=torch.float32) - base[key].to(
                        device=vectors[key].device, dtype=torch.float32
                    )
                changed = changed or bool(diff.any())
                vectors[key][index] = diff.to(storage)
            if not changed:
                warnings.warn(
                    f"expert {expert_name!r} is identical to the pretrained model over the merge scope: "
                    "its task vector is zero",
                    stacklevel=2,
                )
        for key, pairs in factors.items():
            vectors[key] = LowRankStack.from_factors(pairs, base[key].shape, storage).to(device=device)
        return cls({key: vectors[key] for key in keys}, list(named))

    # ------------------------------------------------------------------ access
    @property
    def keys(self) -> list[str]:
        return list(self._vectors)

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self._vectors.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self._vectors.values())).device

    def __getitem__(self, key: str) -> Tensor:
        """``[K, *shape]``; a low-rank key is materialised (a new tensor on every access)."""
        value = self._vectors[key]
        return value.dense() if isinstance(value, LowRankStack) else value

    def low_rank(self, key: str) -> LowRankStack | None:
        """The factors of a key kept low-rank, ``None`` for a dense one."""
        value = self._vectors[key]
        return value if isinstance(value, LowRankStack) else None

    def shape(self, key: str) -> torch.Size:
        """``[K, *shape]`` of a key without materialising it."""
        return self._vectors[key].shape

    def __contains__(self, key: object) -> bool:
        return key in self._vectors

    def __len__(self) -> int:
        return len(self._vectors)

    def __iter__(self) -> Iterator[str]:
        return iter(self._vectors)

    def items(self) -> Iterable[tuple[str, Tensor]]:
        """``(key, [K, *shape])`` pairs, low-rank keys materialised one at a time."""
        return ((key, self[key]) for key in self._vectors)

    def numel(self) -> int:
        """Number of entries per expert (of the dense tensors they stand for)."""
        return sum(math.prod(t.shape[1:]) for t in self._vectors.values())

    def nbytes(self) -> int:
        """Bytes held by all experts' vectors in their storage dtype (factors for low-rank keys)."""
        return sum(
            t.nbytes() if isinstance(t, LowRankStack) else t.numel() * t.element_size() for t in self._vectors.values()
        )

    def __repr__(self) -> str:
        low_rank = sum(isinstance(t, LowRankStack) for t in self._vectors.values())
        return (
            f"TaskVectors(experts={list(self.expert_names)}, tensors={len(self)}"
            f"{f' ({low_rank} low-rank)' if low_rank else ''}, numel_per_expert={self.numel()}, dtype={self.dtype})"
        )

    def to(self, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None) -> "TaskVectors":
        """A copy in another storage dtype and/or device (bf16/fp16 halve the memory); low-rank keys stay low-rank."""
        dtype = _as_dtype(dtype) if dtype is not None else None
        return TaskVectors({k: t.to(device=device, dtype=dtype) for k, t in self._vectors.items()}, self.expert_names)

    def select(self, keys: Iterable[str]) -> "TaskVectors":
        """Only the given parameter keys."""
        keys = list(keys)
        unknown = [k for k in keys if k not in self._vectors]
        if unknown:
            raise KeyError(f"not in these task vectors: {unknown[:5]}")
        return TaskVectors({k: self._vectors[k] for k in keys}, self.expert_names)

    def l1_norms(self) -> dict[str, Tensor]:
        """``key -> [K]`` L1 norm of each expert's vector for that tensor (float32)."""
        return {k: t.flatten(1).float().abs().sum(dim=1) for k, t in self.items()}

    def _map(self, fn) -> "TaskVectors":
        """``fn`` on every ``[K, *shape]`` tensor (low-rank keys materialised: the result is dense)."""
        return TaskVectors({k: fn(t) for k, t in self.items()}, self.expert_names)

    # ------------------------------------------------------------------ transforms
    def trim(self, density: float, scope: TrimScope = "tensor") -> "TaskVectors":
        """TIES trim: keep each expert's top-``density`` entries by magnitude.

        ``scope="tensor"`` keeps the top fraction of every tensor separately (exactly
        ``ceil(density·n)`` entries each); ``scope="model"`` uses one magnitude threshold
        per expert over the whole scope, as in the TIES reference implementation.
        """
        if scope == "tensor":
            return self._map(lambda t: tensor_ops.trim(t, density))
        if scope == "model":
            thresholds = self.model_thresholds(density)
            return self._map(lambda t: tensor_ops.trim_below(t, thresholds.to(t.device)))
        raise ValueError(f"unknown trim scope {scope!r}; use 'tensor' or 'model'")

    def model_thresholds(self, density: float) -> Tensor:
        """Per expert, the smallest magnitude among its top-``density`` entries over the whole scope."""
        vectors = [t for _, t in self.items()]
        return torch.stack(
            [
                tensor_ops.magnitude_threshold(torch.cat([t[k].flatten() for t in vectors]), density)
                for k in range(self.num_experts)
            ]
        )

    def elect_and_mask(self, method: tensor_ops.SignMethod = "sum") -> "TaskVectors":
        """TIES elect + disjoint: zero every entry whose sign disagrees with the elected sign."""

        def mask(t: Tensor) -> Tensor:
            return t * tensor_ops.agrees(t, tensor_ops.elect_sign(t.float(), method).to(t.dtype))

        return self._map(mask)

    def ties(
        self, density: float = 0.2, scope: TrimScope = "model", method: tensor_ops.SignMethod = "sum"
    ) -> "TaskVectors":
        """TIES-processed vectors, one per expert (the input of AdaMerging++)."""
        return self.trim(density, scope).elect_and_mask(method)

    def dare(self, density: float = 0.5, seed: int = 0, rescale: bool = True) -> "TaskVectors":
        """DARE: random drop with probability ``1 - density`` and rescale; reproducible from ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        return self._map(lambda t: tensor_ops.dare(t, density, generator, rescale))

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Save to one safetensors file (expert names in the metadata; low-rank keys as their
        factors ``<key>@left``, ``<key>@right``, ``<key>@owner``)."""
        tensors, low_rank = {}, []
        for key, value in self._vectors.items():
            if isinstance(value, LowRankStack):
                low_rank.append(key)
                tensors.update({f"{key}@left": value.left, f"{key}@right": value.right, f"{key}@owner": value.owner})
            else:
                tensors[key] = value
        metadata = {
            "format": "adamerge.core.task_vectors",
            "expert_names": json.dumps(list(self.expert_names)),
            "low_rank": json.dumps(low_rank),
        }
        save_safetensors(tensors, path, metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> "TaskVectors":
        with safe_open(str(path), framework="pt", device=str(device or "cpu")) as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != "adamerge.core.task_vectors":
                raise ValueError(f"{path} is not an adamerge task-vector file")
            names, low_rank = json.loads(metadata["expert_names"]), json.loads(metadata.get("low_rank", "[]"))
            factors = {f"{key}@{part}" for key in low_rank for part in ("left", "right", "owner")}
            vectors = {key: handle.get_tensor(key) for key in handle.keys() if key not in factors}
            for key in low_rank:
                left, right, owner = (handle.get_tensor(f"{key}@{part}") for part in ("left", "right", "owner"))
                vectors[key] = LowRankStack(left, right, owner, len(names))
        return cls(vectors, names)


class OpenedExperts(NamedTuple):
    """The pretrained weights, the merge scope's keys, the experts by name (LoRA adapters opened
    over the pretrained weights), the experts whose τ is their ΔW, and the matrices whose τ stays
    as LoRA factors."""

    base: Mapping[str, Tensor]
    keys: list[str]
    named: dict[str, WeightsSource]
    deltas: set[str]
    factored: set[str]


def open_experts(
    pretrained: WeightsSource, experts: Experts, include: Patterns = None, exclude: Patterns = None, low_rank: bool = True
) -> OpenedExperts:
    """What building task vectors starts from (see :class:`OpenedExperts`); ``factored`` is empty
    unless ``low_rank`` and every expert is a LoRA adapter over ``pretrained``."""
    base = open_weights(pretrained, "pretrained")
    keys = scope_keys(pretrained, base, include, exclude)
    # a LoRA adapter is θ_0 + ΔW lazily; its τ is ΔW itself, in float32 (io/lora.py)
    named = {
        name: open_adapter(source, base, f"expert {name!r}") if is_adapter(source) else source
        for name, source in name_experts(experts).items()
    }
    # τ is ΔW only for adapters over these pretrained weights; one opened over other weights is θ_k like any model
    deltas = {name for name, source in named.items() if _is_lora_over(source, base, keys)}
    factored = _low_rank_keys([named[name] for name in deltas], keys, base) if low_rank and len(deltas) == len(named) else set()
    return OpenedExperts(base, keys, named, deltas, factored)


def _is_lora_over(source: WeightsSource, base: Mapping[str, Tensor], keys: Sequence[str]) -> bool:
    """A LoRA expert whose own base is ``base`` over the scope (so that ``θ_k − θ_0 = ΔW``)."""
    if not isinstance(source, LoraExpert):
        return False
    return source.base is base or all(torch.equal(source.base[key], base[key]) for key in keys)


def _low_rank_keys(experts: Sequence[LoraExpert], keys: Sequence[str], base: Mapping[str, Tensor]) -> set[str]:
    """The matrices whose τ can stay factored: saved whole by none of the (LoRA) experts."""
    return {key for key in keys if base[key].dim() == 2 and not any(key in expert.adapter.full for expert in experts)}


def check_factors(expert_name: str, key: str, pair: tuple[Tensor, Tensor] | None) -> None:
    """LoRA factors of one key of one expert hold finite values only."""
    if pair is not None and not all(torch.isfinite(factor).all() for factor in pair):
        raise ValueError(f"expert {expert_name!r} has non-finite values (NaN/inf) in the LoRA factors of {key!r}")


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16'")
    return resolved

