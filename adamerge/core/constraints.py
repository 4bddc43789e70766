"""Constraints on merge coefficients: how stored (raw) values map to effective ones.

``clamp`` keeps coefficients in ``[lo, hi]`` by projection after each step (AdaMerging);
``sigmoid`` stores logits, as Expert Merging does, so every value stays strictly inside.
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


ConstraintSpec = Union[Constraint, str, Mapping, None]


def make_constraint(spec: ConstraintSpec) -> Constraint:
    """``None``/``"none"``, ``"clamp"``, ``"sigmoid"``, ``{"name": "clamp", "lo": 0, "hi": 1}`` or an instance."""
    if isinstance(spec, Constraint):
        return spec
    if spec is None:
        return Constraint()
    if isinstance(spec, str):
        spec = {"name": spec}
    options = dict(spec)
    name = options.pop("name", None)
    kinds = {"none": Constraint, "clamp": Clamp, "sigmoid": Sigmoid}
    if name not in kinds:
        raise ValueError(f"unknown constraint {name!r}; use one of {list(kinds)}")
    if name == "none":
        return Constraint()
    options = {k: v for k, v in options.items() if v is not None and not (isinstance(v, float) and math.isinf(v))}
    return kinds[name](**options)
