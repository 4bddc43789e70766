"""Task vectors: what each expert changed, ``τ_k = θ_k − θ_0``, over a chosen merge scope.

Stored experts-first (``[K, *shape]`` per parameter) in a storage dtype of your choice,
so a merge is one weighted sum over dim 0 and TIES/DARE are per-expert transforms that
keep one vector per expert (which is what AdaMerging++ learns on).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal, Union

import torch
from safetensors import safe_open
from torch import Tensor, nn

from adamerge.core import tensor_ops
from adamerge.io.checkpoints import WeightsSource, describe, open_weights, save_safetensors
from adamerge.io.lora import is_adapter, open_adapter

Patterns = Union[str, Sequence[str], None]
Experts = Union[Mapping[str, WeightsSource], Sequence[WeightsSource]]
TrimScope = Literal["tensor", "model"]


def _compile(patterns: Patterns) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    return [re.compile(p) for p in patterns]


def in_scope(name: str, include: Patterns = None, exclude: Patterns = None) -> bool:
    """A name is in scope if it matches any ``include`` regex (all do when None) and no ``exclude``."""
    includes, excludes = _compile(include), _compile(exclude)
    if includes and not any(p.search(name) for p in includes):
        return False
    return not any(p.search(name) for p in excludes)


def name_experts(experts: Experts) -> dict[str, WeightsSource]:
    """Experts as an ordered ``name -> source`` mapping (a list is named ``expert_0, expert_1, ...``)."""
    if isinstance(experts, Mapping):
        if any(isinstance(v, Tensor) for v in experts.values()):
            raise TypeError("experts must be a list or a name -> model mapping, not a single state dict")
        named = dict(experts)
    elif isinstance(experts, (nn.Module, str, Path)):
        raise TypeError("experts must be a list or a name -> model mapping, not a single model")
    else:
        named = {f"expert_{i}": source for i, source in enumerate(experts)}
    if not named:
        raise ValueError("no experts given: a merge needs at least one expert")
    return named


def parameter_aliases(module: nn.Module) -> dict[str, str]:
    """``alias -> canonical name`` for tied parameters (e.g. an LM head sharing the embedding)."""
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in canonical:
            aliases[name] = canonical[id(param)]
        else:
            canonical[id(param)] = name
    return aliases


class TaskVectors:
    """Per-expert task vectors over a merge scope: ``key -> Tensor[K, *shape]``."""

    def __init__(self, vectors: Mapping[str, Tensor], expert_names: Sequence[str]):
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
    ) -> "TaskVectors":
        """Compute ``τ_k = θ_k − θ_0`` for every expert over the merge scope.

        The default scope is every floating-point parameter of ``pretrained`` (all floating
        tensors when it is given as a file or state dict). Each expert is read once, one
        tensor at a time; differences are taken in float32 and stored in ``dtype``
        (float32 by default). Bad input raises an error naming the expert and the key.
        """
        storage = _as_dtype(dtype) if dtype is not None else torch.float32
        named = name_experts(experts)
        base = open_weights(pretrained, "pretrained")
        keys = scope_keys(pretrained, base, include, exclude)
        vectors = {
            key: torch.empty((len(named), *base[key].shape), dtype=storage, device=device) for key in keys
        }
        _check_finite(base, keys, "the pretrained model")
        for index, (expert_name, source) in enumerate(named.items()):
            changed = False
            # a LoRA adapter is θ_0 + ΔW lazily; its τ is ΔW itself, in float32 (io/lora.py)
            lora = open_adapter(source, base, f"expert {expert_name!r}") if is_adapter(source) else None
            for key, tensor in expert_tensors(expert_name, source if lora is None else lora, pretrained, base, keys, include, exclude):
                reference = base[key]
                if lora is not None:
                    diff = lora.delta(key).to(vectors[key].device)
                else:
                    diff = tensor.to(device=vectors[key].device, dtype=torch.float32) - reference.to(
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
        return cls(vectors, list(named))

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
        return self._vectors[key]

    def __contains__(self, key: object) -> bool:
        return key in self._vectors

    def __len__(self) -> int:
        return len(self._vectors)

    def __iter__(self) -> Iterator[str]:
        return iter(self._vectors)

    def items(self) -> Iterable[tuple[str, Tensor]]:
        return self._vectors.items()

    def numel(self) -> int:
        """Number of entries per expert."""
        return sum(t[0].numel() for t in self._vectors.values())

    def nbytes(self) -> int:
        """Bytes held by all experts' vectors in their storage dtype."""
        return sum(t.numel() * t.element_size() for t in self._vectors.values())

    def __repr__(self) -> str:
        return (
            f"TaskVectors(experts={list(self.expert_names)}, tensors={len(self)}, "
            f"numel_per_expert={self.numel()}, dtype={self.dtype})"
        )

    def to(self, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None) -> "TaskVectors":
        """A copy in another storage dtype and/or device (bf16/fp16 halve the memory)."""
        dtype = _as_dtype(dtype) if dtype is not None else None
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def select(self, keys: Iterable[str]) -> "TaskVectors":
        """Only the given parameter keys."""
        keys = list(keys)
        unknown = [k for k in keys if k not in self._vectors]
        if unknown:
            raise KeyError(f"not in these task vectors: {unknown[:5]}")
        return TaskVectors({k: self._vectors[k] for k in keys}, self.expert_names)

    def l1_norms(self) -> dict[str, Tensor]:
        """``key -> [K]`` L1 norm of each expert's vector for that tensor (float32)."""
        return {k: t.flatten(1).float().abs().sum(dim=1) for k, t in self._vectors.items()}

    def _map(self, fn) -> "TaskVectors":
        return TaskVectors({k: fn(t) for k, t in self._vectors.items()}, self.expert_names)

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
        return torch.stack(
            [
                tensor_ops.magnitude_threshold(torch.cat([t[k].flatten() for t in self._vectors.values()]), density)
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
        """Save to one safetensors file (expert names in the metadata)."""
        metadata = {"format": "adamerge.core.task_vectors", "expert_names": json.dumps(list(self.expert_names))}
        save_safetensors(self._vectors, path, metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> "TaskVectors":
        with safe_open(str(path), framework="pt", device=str(device or "cpu")) as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != "adamerge.core.task_vectors":
                raise ValueError(f"{path} is not an adamerge task-vector file")
            vectors = {key: handle.get_tensor(key) for key in handle.keys()}
        return cls(vectors, json.loads(metadata["expert_names"]))


def scope_keys(pretrained: WeightsSource, base: Mapping[str, Tensor], include: Patterns = None, exclude: Patterns = None) -> list[str]:
    """The merge scope: the floating-point parameters of ``pretrained`` (every floating tensor
    when it is a file or state dict) that ``include``/``exclude`` select; an empty scope is an error."""
    if isinstance(pretrained, nn.Module):
        candidates = [n for n, p in pretrained.named_parameters() if p.is_floating_point()]
    else:
        candidates = [n for n, t in base.items() if t.is_floating_point()]
    keys = [n for n in candidates if in_scope(n, include, exclude)]
    if not keys:
        raise ValueError(
            f"the merge scope is empty: include={include!r} exclude={exclude!r} match no floating-point "
            f"parameter of the pretrained model {describe(pretrained)}"
        )
    return keys


def expert_tensors(
    name: str,
    source: WeightsSource,
    pretrained: WeightsSource,
    base: Mapping[str, Tensor],
    keys: Sequence[str],
    include: Patterns = None,
    exclude: Patterns = None,
    role: str = "expert",
) -> Iterator[tuple[str, Tensor]]:
    """An expert's ``(key, tensor)`` over the scope, read one tensor at a time, each checked
    against the pretrained one (keys, shape, dtype, finite values); errors name the expert and the key."""
    who = f"{role} {name!r}"
    weights = open_weights(source, who)
    # an expert module's own tied aliases are not extra keys, even when the pretrained
    # model comes from a file that saved only the canonical names
    aliases = parameter_aliases(pretrained) if isinstance(pretrained, nn.Module) else {}
    own_aliases = parameter_aliases(source) if isinstance(source, nn.Module) else {}
    check_keys(name, weights, base, keys, {**aliases, **own_aliases}, include, exclude)
    for key in keys:
        tensor = weights[key]
        check_tensor(who, key, tensor, base[key])
        yield key, tensor


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16'")
    return resolved


def check_tensor(who: str, key: str, tensor: Tensor, reference: Tensor) -> None:
    """One tensor of a model against the pretrained one: same shape and dtype, finite values."""
    if tensor.shape != reference.shape:
        raise ValueError(
            f"shape mismatch for {key!r}: {who} has {tuple(tensor.shape)}, "
            f"the pretrained model has {tuple(reference.shape)}"
        )
    if tensor.dtype != reference.dtype:
        raise ValueError(
            f"dtype mismatch for {key!r}: {who} is {tensor.dtype}, the pretrained "
            f"model is {reference.dtype}; load both in the same dtype"
        )
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{who} has non-finite values (NaN/inf) in {key!r}")


def _check_finite(weights: Mapping[str, Tensor], keys: Sequence[str], who: str) -> None:
    for key in keys:
        if not torch.isfinite(weights[key]).all():
            raise ValueError(f"{who} has non-finite values (NaN/inf) in {key!r}")


def check_keys(
    expert_name: str,
    weights: Mapping[str, Tensor],
    base: Mapping[str, Tensor],
    keys: Sequence[str],
    aliases: Mapping[str, str],
    include: Patterns,
    exclude: Patterns,
) -> None:
    missing = [k for k in keys if k not in weights]
    if missing:
        hint = ""
        prefixed = [w for w in weights if w.endswith("." + missing[0])]
        if prefixed:
            prefix = prefixed[0][: -len(missing[0])]
            hint = (
                f" (the expert has {prefixed[0]!r}: pass its inner model, e.g. model.base_model, "
                f"or strip the prefix {prefix!r})"
            )
        raise KeyError(
            f"expert {expert_name!r} is missing {len(missing)} key(s) of the merge scope, first {missing[0]!r}{hint}"
        )
    extra = [k for k in weights if k not in base and k not in aliases and in_scope(k, include, exclude)]
    if extra:
        raise KeyError(
            f"expert {expert_name!r} has key {extra[0]!r} (and {len(extra) - 1} more) that the pretrained model "
            f"lacks: exclude it (e.g. exclude=[{extra[0].split('.')[0]!r}]) or check that the models share an architecture"
        )
