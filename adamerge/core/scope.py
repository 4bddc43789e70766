"""The merge scope and the experts read over it: which tensors a merge covers (``include``/
``exclude`` regexes over the pretrained model's floating-point parameters), tied aliases, and
each expert's tensors read one at a time and checked against the pretrained ones (keys, shape,
dtype, finite values), with errors that name the expert and the key.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Union

import torch
from torch import Tensor, nn

from adamerge.io.checkpoints import WeightsSource, describe, open_weights

Patterns = Union[str, Sequence[str], None]
Experts = Union[Mapping[str, WeightsSource], Sequence[WeightsSource]]


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
    """An expert's ``(key, tensor)`` over the scope, read one tensor at a time in the pretrained
    tensor's dtype (``problem.dtype`` chooses it), each checked against the pretrained one (keys,
    shape, dtype kind, finite values); errors name the expert and the key."""
    who = f"{role} {name!r}"
    weights = expert_weights(name, source, pretrained, base, keys, include, exclude, role)
    for key in keys:
        tensor = weights[key]
        check_tensor(who, key, tensor, base[key])
        yield key, tensor.to(base[key].dtype)


def expert_weights(
    name: str,
    source: WeightsSource,
    pretrained: WeightsSource,
    base: Mapping[str, Tensor],
    keys: Sequence[str],
    include: Patterns = None,
    exclude: Patterns = None,
    role: str = "expert",
) -> Mapping[str, Tensor]:
    """An expert's weights opened (lazily where the format allows) with its keys checked against
    the scope's: none missing, none the pretrained model lacks; errors name the expert."""
    weights = open_weights(source, f"{role} {name!r}")
    # an expert module's own tied aliases are not extra keys, even when the pretrained
    # model comes from a file that saved only the canonical names
    aliases = parameter_aliases(pretrained) if isinstance(pretrained, nn.Module) else {}
    own_aliases = parameter_aliases(source) if isinstance(source, nn.Module) else {}
    check_keys(name, weights, base, keys, {**aliases, **own_aliases}, include, exclude)
    return weights


def check_tensor(who: str, key: str, tensor: Tensor, reference: Tensor) -> None:
    """One tensor of a model against the pretrained one: same shape, both floating point or the same
    dtype (a bf16 expert over a float32 model is read in float32, and the other way round), finite values."""
    if tensor.shape != reference.shape:
        raise ValueError(
            f"shape mismatch for {key!r}: {who} has {tuple(tensor.shape)}, "
            f"the pretrained model has {tuple(reference.shape)}"
        )
    if tensor.dtype != reference.dtype and not (tensor.is_floating_point() and reference.is_floating_point()):
        raise ValueError(
            f"dtype mismatch for {key!r}: {who} is {tensor.dtype}, the pretrained "
            f"model is {reference.dtype}; only floating-point tensors are read in the pretrained model's dtype"
        )
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{who} has non-finite values (NaN/inf) in {key!r}")


def check_finite(weights: Mapping[str, Tensor], keys: Sequence[str], who: str) -> None:
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
