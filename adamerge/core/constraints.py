"""Constraints on merge coefficients: how stored (raw) values map to effective ones.

``clamp`` keeps coefficients in ``[lo, hi]`` by projection after each step (AdaMerging);
``sigmoid`` stores logits, as Expert Merging does, so every value stays strictly inside;
``mask`` makes every coefficient ``lo`` or ``hi``, a binary mask learned through a relaxation
(AdaRank's per-component masks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Union

import torch
from torch import Tensor


class Constraint:
    """Maps stored (raw) values to effective coefficients and back."""

    name = "none"
    lo, hi = -math.inf, math.inf

    def to_effective(self, raw: Tensor) -> Tensor:
        return raw

    def to_raw(self, effective: Tensor) -> Tensor:
        self._check_range(effective)
        return effective.clone()

    def project_(self, raw: Tensor) -> None:
        """Keep raw values feasible after an optimiser step (no-op unless bounded)."""

    def describe(self) -> dict:
        return {"name": self.name, "lo": self.lo, "hi": self.hi}

    def _check_range(self, effective: Tensor, strict: bool = False) -> None:
        low = effective <= self.lo if strict else effective < self.lo
        high = effective >= self.hi if strict else effective > self.hi
        if bool((low | high).any()):
            bad = effective[low | high].flatten()[0].item()
            interval = f"({self.lo}, {self.hi})" if strict else f"[{self.lo}, {self.hi}]"
            raise ValueError(f"initial coefficient {bad} is outside the {self.name} range {interval}")


class Clamp(Constraint):
    """Coefficients kept in ``[lo, hi]``: clamped in the forward and projected after each step."""

    name = "clamp"

    def __init__(self, lo: float = 0.0, hi: float = 1.0):
        if not lo < hi:
            raise ValueError(f"clamp needs lo < hi, got [{lo}, {hi}]")
        self.lo, self.hi = float(lo), float(hi)

    def to_effective(self, raw: Tensor) -> Tensor:
        return raw.clamp(self.lo, self.hi)

    def project_(self, raw: Tensor) -> None:
        with torch.no_grad():
            raw.clamp_(self.lo, self.hi)


class Sigmoid(Constraint):
    """Coefficients ``lo + (hi - lo)·sigmoid(raw)``, stored as logits.

    The raw value is chosen so the effective initial value equals the requested one
    exactly in float32, not merely to rounding error.
    """

    name = "sigmoid"

    def __init__(self, lo: float = 0.0, hi: float = 1.0):
        if not lo < hi:
            raise ValueError(f"sigmoid needs lo < hi, got [{lo}, {hi}]")
        self.lo, self.hi = float(lo), float(hi)

    def to_effective(self, raw: Tensor) -> Tensor:
        return self.lo + (self.hi - self.lo) * torch.sigmoid(raw)

    def to_raw(self, effective: Tensor) -> Tensor:
        self._check_range(effective, strict=True)
        target = effective.float()
        p = (effective.double() - self.lo) / (self.hi - self.lo)
        raw = (torch.log(p) - torch.log1p(-p)).float()
        for _ in range(64):
            current = self.to_effective(raw)
            step = torch.where(
                current < target,
                torch.nextafter(raw, torch.full_like(raw, math.inf)),
                torch.where(current > target, torch.nextafter(raw, torch.full_like(raw, -math.inf)), raw),
            )
            if torch.equal(step, raw):
                break
            raw = step
        return raw


class Mask(Constraint):
    """Binary coefficients, ``lo`` or ``hi``: AdaRank's masks (Lee et al., "AdaRank: Adaptive Rank
    Pruning for Enhanced Model Merging", ICLR 2026, arXiv 2503.22178), scaled by the task
    coefficient λ = ``hi`` (``lo = 0`` drops what the coefficient scales).

    The raw value is a logit ``m``. Forward: ``hi`` where ``sigmoid(m / T) > 0.5`` (``m > 0``),
    else ``lo``. Backward: the straight-through estimator of the relaxation
    ``lo + (hi - lo)·sigmoid(m / T)``, so ``∂c/∂m = (hi - lo)·sigmoid'(m / T) / T``. An initial
    value must be ``lo`` or ``hi`` and starts at logit ``∓0.1`` (AdaRank's released code; its
    temperature for task-arithmetic starts is 10): ``0.1 / lr`` Adam steps of one sign flip it.
    Departure: AdaRank's code also trains a layer-wise λ jointly with the masks; here λ is fixed.
    """

    name = "mask"
    START = 0.1

    def __init__(self, lo: float = 0.0, hi: float = 1.0, temperature: float = 10.0):
        if not lo < hi:
            raise ValueError(f"mask needs lo < hi, got [{lo}, {hi}]")
        if not temperature > 0:
            raise ValueError(f"mask needs a temperature > 0, got {temperature}")
        self.lo, self.hi, self.temperature = float(lo), float(hi), float(temperature)

    def to_effective(self, raw: Tensor) -> Tensor:
        relaxed = (self.hi - self.lo) * torch.sigmoid(raw / self.temperature)
        hard = torch.where(raw > 0, self.hi, self.lo).to(raw.dtype)
        return hard + (relaxed - relaxed.detach())  # exactly lo or hi; the relaxation's gradient

    def to_raw(self, effective: Tensor) -> Tensor:
        on, off = effective == self.hi, effective == self.lo
        if not bool((on | off).all()):
            bad = effective[~(on | off)].flatten()[0].item()
            raise ValueError(f"initial coefficient {bad} is neither of the mask's values {self.lo} and {self.hi}")
        return torch.where(on, self.START, -self.START).float()

    def describe(self) -> dict:
        return {**super().describe(), "temperature": self.temperature}


ConstraintSpec = Union[Constraint, str, Mapping, None]


def make_constraint(spec: ConstraintSpec) -> Constraint:
    """``None``/``"none"``, ``"clamp"``, ``"sigmoid"``, ``"mask"``, ``{"name": "clamp", "lo": 0, "hi": 1}``
    (a mask also takes ``temperature``) or an instance."""
    if isinstance(spec, Constraint):
        return spec
    if spec is None:
        return Constraint()
    if isinstance(spec, str):
        spec = {"name": spec}
    options = dict(spec)
    name = options.pop("name", None)
    kinds = {"none": Constraint, "clamp": Clamp, "sigmoid": Sigmoid, "mask": Mask}
    if name not in kinds:
        raise ValueError(f"unknown constraint {name!r}; use one of {list(kinds)}")
    if name == "none":
        return Constraint()
    options = {k: v for k, v in options.items() if v is not None and not (isinstance(v, float) and math.isinf(v))}
    return kinds[name](**options)
