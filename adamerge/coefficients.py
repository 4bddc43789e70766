"""Merge coefficients: how many there are (granularity), how they are bounded, where they start.

A *layout* says which coefficient slot each merged tensor reads: one slot for the whole
model (``task``), one per tensor (``layer``), one per group of tensors (``group``), or
``m`` slots per tensor, each covering a contiguous chunk of rows (``chunk``). Every slot
holds one value per expert, so all coefficients together are a ``[K, S]`` matrix.
``MergeCoefficients`` owns that matrix as an ``nn.Parameter`` (plus frozen slots).
The ``element`` layout has one slot per tensor whose value is a whole tensor per expert
(one coefficient per task-vector entry); :mod:`adamerge.element` owns those.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

import torch
from safetensors import safe_open
from torch import Tensor, nn

from adamerge.checkpoints import UnreadableInput, reading, save_safetensors, write_text

Granularity = Literal["task", "layer", "group", "chunk", "element"]
GRANULARITIES = ("task", "layer", "group", "chunk", "element")
_INDEX = re.compile(r"(^|\.)(\d+)(\.|$)")


def block_of(name: str) -> str | None:
    """The block a parameter belongs to: its name up to the first numeric component, if any.

    ``encoder.layer.3.attention.self.query.weight`` → ``encoder.layer.3``.
    """
    match = _INDEX.search(name)
    return name[: match.end(2)] if match else None


def module_of(name: str) -> str:
    """The module that owns a parameter (``a.b.weight`` → ``a.b``)."""
    return name.rsplit(".", 1)[0] if "." in name else name


def chunk_sizes(rows: int, chunks: int) -> list[int]:
    """Row counts of ``chunks`` contiguous chunks (as ``torch.tensor_split``: larger ones first)."""
    base, extra = divmod(rows, chunks)
    return [base + 1] * extra + [base] * (chunks - extra)


@dataclass(frozen=True)
class CoefficientLayout:
    """Which slot(s) each merged tensor reads, and which slots are frozen.

    ``tensor_slots[key]`` lists the slots of that tensor's chunks, in row order (one slot
    unless the tensor is chunked). ``rows[key]`` is its first dimension.
    """

    expert_names: tuple[str, ...]
    granularity: str
    slot_names: tuple[str, ...]
    tensor_slots: dict[str, tuple[int, ...]]
    rows: dict[str, int]
    numels: dict[str, int]
    frozen: frozenset[int] = field(default_factory=frozenset)

    @property
    def num_slots(self) -> int:
        return len(self.slot_names)

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    @property
    def keys(self) -> list[str]:
        return list(self.tensor_slots)

    @property
    def trainable_slots(self) -> list[int]:
        return [s for s in range(self.num_slots) if s not in self.frozen]

    @property
    def frozen_slots(self) -> list[int]:
        return sorted(self.frozen)

    def to_json(self) -> str:
        return json.dumps(
            {
                "expert_names": list(self.expert_names),
                "granularity": self.granularity,
                "slot_names": list(self.slot_names),
                "tensor_slots": {k: list(v) for k, v in self.tensor_slots.items()},
                "rows": self.rows,
                "numels": self.numels,
                "frozen": sorted(self.frozen),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> "CoefficientLayout":
        data = json.loads(text)
        return cls(
            expert_names=tuple(data["expert_names"]),
            granularity=data["granularity"],
            slot_names=tuple(data["slot_names"]),
            tensor_slots={k: tuple(v) for k, v in data["tensor_slots"].items()},
            rows={k: int(v) for k, v in data["rows"].items()},
            numels={k: int(v) for k, v in data["numels"].items()},
            frozen=frozenset(data["frozen"]),
        )


GroupSpec = Union[str, Sequence[str], Mapping[str, str], None]
ChunkSpec = Union[int, Mapping[str, int], None]


def build_layout(
    expert_names: Sequence[str],
    shapes: Mapping[str, Sequence[int]],
    granularity: Granularity = "layer",
    groups: GroupSpec = None,
    chunks: ChunkSpec = None,
    freeze: str | Sequence[str] | None = None,
) -> CoefficientLayout:
    """Lay out coefficient slots for tensors of the given shapes.

    - ``groups`` (granularity ``group``): ``"block"`` for one group per numbered block (e.g.
      per transformer layer) and one per other module, or ``{group_name: regex}`` / a list of
      regexes; a tensor joins the first group whose regex it matches, unmatched tensors
      share the group ``"other"``.
    - ``chunks`` (granularity ``chunk``): chunks per tensor, an int for all tensors or a map
      from exact name or regex to ``m`` (unlisted tensors get 1). ``m = 1`` equals ``layer``;
      ``m = 0`` freezes that tensor's coefficient at its initial value.
    - ``freeze``: regexes of tensors whose coefficients stay at their initial value.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; use one of {GRANULARITIES}")
    if groups is not None and granularity != "group":
        raise ValueError(f"'groups' is only used with granularity 'group', not {granularity!r}")
    if chunks is not None and granularity != "chunk":
        raise ValueError(f"'chunks' is only used with granularity 'chunk', not {granularity!r}")
    freeze_patterns = [re.compile(p) for p in ([freeze] if isinstance(freeze, str) else freeze or [])]
    rows = {k: (int(s[0]) if len(s) else 1) for k, s in shapes.items()}
    numels = {k: math.prod(int(d) for d in s) for k, s in shapes.items()}

    slot_names: list[str] = []
    slot_of_name: dict[str, int] = {}
    frozen: set[int] = set()
    tensor_slots: dict[str, tuple[int, ...]] = {}

    def slot(name: str, is_frozen: bool = False) -> int:
        if name not in slot_of_name:
            slot_of_name[name] = len(slot_names)
            slot_names.append(name)
            if is_frozen:
                frozen.add(slot_of_name[name])
        return slot_of_name[name]

    group_of = _group_function(groups) if granularity == "group" else None
    chunk_of = _chunk_function(chunks, shapes) if granularity == "chunk" else None
    for key in shapes:
        if any(p.search(key) for p in freeze_patterns):
            tensor_slots[key] = (slot(f"{key} (frozen)", is_frozen=True),)
        elif granularity == "task":
            tensor_slots[key] = (slot("all"),)
        elif granularity in ("layer", "element"):  # element: the slot holds one value per entry
            tensor_slots[key] = (slot(key),)
        elif granularity == "group":
            tensor_slots[key] = (slot(group_of(key)),)
        else:
            m = chunk_of(key)
            if m == 0:
                tensor_slots[key] = (slot(f"{key} (frozen)", is_frozen=True),)
            elif m > rows[key]:
                raise ValueError(f"chunks for {key!r}: m={m} exceeds its first dimension ({rows[key]})")
            elif m == 1:
                tensor_slots[key] = (slot(key),)
            else:
                tensor_slots[key] = tuple(slot(f"{key}[{j}/{m}]") for j in range(m))
    return CoefficientLayout(
        expert_names=tuple(expert_names),
        granularity=granularity,
        slot_names=tuple(slot_names),
        tensor_slots=tensor_slots,
        rows=rows,
        numels=numels,
        frozen=frozenset(frozen),
    )


def _group_function(groups: GroupSpec):
    if groups is None or groups == "block":
        return lambda key: block_of(key) or module_of(key)
    if isinstance(groups, str):
        raise ValueError(f"unknown groups {groups!r}; use 'block', a list of regexes or a name -> regex map")
    named = dict(groups) if isinstance(groups, Mapping) else {p: p for p in groups}
    compiled = [(name, re.compile(pattern)) for name, pattern in named.items()]

    def group_of(key: str) -> str:
        return next((name for name, pattern in compiled if pattern.search(key)), "other")

    return group_of


def _chunk_function(chunks: ChunkSpec, shapes: Mapping[str, Sequence[int]]):
    if chunks is None:
        return lambda key: 1
    if isinstance(chunks, int):
        if chunks < 0:
            raise ValueError(f"chunk counts must be >= 0, got {chunks}")
        return lambda key: chunks
    exact = {k: int(v) for k, v in chunks.items() if k in shapes}
    patterns = [(re.compile(k), int(v)) for k, v in chunks.items() if k not in shapes]
    for value in list(exact.values()) + [v for _, v in patterns]:
        if value < 0:
            raise ValueError(f"chunk counts must be >= 0, got {value}")

    def chunk_of(key: str) -> int:
        if key in exact:
            return exact[key]
        return next((m for pattern, m in patterns if pattern.search(key)), 1)

    return chunk_of


# ---------------------------------------------------------------------- constraints


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


# ---------------------------------------------------------------------- the module

InitSpec = Union[float, Sequence[float], Mapping[str, float], Tensor, "MergeCoefficients", str, Path]


class MergeCoefficients(nn.Module):
    """The ``[K, S]`` coefficient matrix of a layout: trainable slots as one ``nn.Parameter``.

    ``forward()`` returns the effective values (after the constraint) in slot order.
    """

    def __init__(self, layout: CoefficientLayout, init: InitSpec = 0.3, constraint: ConstraintSpec = None):
        super().__init__()
        self.layout = layout
        self.constraint = make_constraint(constraint)
        values = resolve_init(init, layout)
        trainable, frozen = layout.trainable_slots, layout.frozen_slots
        self.raw = nn.Parameter(self.constraint.to_raw(values[:, trainable]))
        # No float32 logit hits some values exactly (e.g. sigmoid at 1e-3: one ulp of the logit
        # moves the output by several ulps), so a constant, ulp-sized residual makes the initial
        # effective values exact. It is zero wherever ``to_raw`` is already exact.
        with torch.no_grad():
            residual = values[:, trainable] - self.constraint.to_effective(self.raw)
        self.register_buffer("residual", residual)
        self.register_buffer("fixed", values[:, frozen].clone())
        order = torch.empty(layout.num_slots, dtype=torch.long)
        order[torch.tensor(trainable + frozen, dtype=torch.long)] = torch.arange(layout.num_slots)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("initial", values.clone())

    def forward(self) -> Tensor:
        effective = torch.cat([self.constraint.to_effective(self.raw) + self.residual, self.fixed], dim=1)
        return effective[:, self.order]

    def project_(self) -> None:
        """Re-impose the constraint's bounds on the raw values (call after an optimiser step)."""
        self.constraint.project_(self.raw)

    def version(self) -> tuple:
        """Changes whenever the coefficient values may have changed (for caching merged weights)."""
        return (
            self.raw._version,
            self.raw.data_ptr(),
            self.fixed._version,
            self.fixed.data_ptr(),
            self.residual._version,
            self.residual.data_ptr(),
        )

    def summary(self) -> Tensor:
        """``[K, S]`` effective values, one per expert and slot (what plots show)."""
        return self().detach()

    def row_values(self, key: str, values: Tensor | None = None) -> Tensor:
        """``[K, rows]``: the coefficient applied to every row of tensor ``key``."""
        values = self() if values is None else values
        slots = self.layout.tensor_slots[key]
        rows = self.layout.rows[key]
        if len(slots) == 1:
            return values[:, slots[0]].unsqueeze(1).expand(-1, rows)
        sizes = torch.tensor(chunk_sizes(rows, len(slots)), device=values.device)
        return values[:, list(slots)].repeat_interleave(sizes, dim=1)

    def as_dict(self) -> dict[str, dict[str, float | list[float]]]:
        """Readable ``expert -> tensor -> value`` (a list of values for a chunked tensor)."""
        with torch.no_grad():
            values = self().cpu()
        out: dict[str, dict[str, float | list[float]]] = {}
        for k, expert in enumerate(self.layout.expert_names):
            out[expert] = {}
            for key, slots in self.layout.tensor_slots.items():
                chunk_values = [round(float(values[k, s]), 6) for s in slots]
                out[expert][key] = chunk_values[0] if len(slots) == 1 else chunk_values
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, extra_metadata: Mapping[str, str] | None = None) -> None:
        """Save effective values, raw values and the layout (safetensors) plus a readable JSON beside it."""
        path = Path(path)
        metadata = {
            "format": "adamerge.coefficients",
            "layout": self.layout.to_json(),
            "constraint": json.dumps(self.constraint.describe()),
            **dict(extra_metadata or {}),
        }
        with torch.no_grad():
            tensors = {"values": self().float(), "raw": self.raw.detach().float(), "initial": self.initial.float()}
        save_safetensors(tensors, path, metadata=metadata)
        readable = {
            "granularity": self.layout.granularity,
            "constraint": self.constraint.describe(),
            "coefficients": self.as_dict(),
        }
        write_text(path.with_suffix(".json"), json.dumps(readable, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "MergeCoefficients":
        """Rebuild saved coefficients exactly (layout, constraint, values)."""
        if not Path(path).exists():
            raise FileNotFoundError(f"coefficients: no file {path}")
        with reading("coefficients", path), safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != "adamerge.coefficients":
                raise UnreadableInput(f"{path} is not an adamerge coefficient file")
            raw = handle.get_tensor("raw")
            initial = handle.get_tensor("initial")
        layout = CoefficientLayout.from_json(metadata["layout"])
        coefficients = cls(layout, init=initial, constraint=make_constraint(json.loads(metadata["constraint"])))
        with torch.no_grad():
            coefficients.raw.copy_(raw)
        return coefficients


def resolve_init(init: InitSpec, layout: CoefficientLayout) -> Tensor:
    """Initial effective values ``[K, S]`` from a scalar, per-expert values or earlier coefficients."""
    K, S = layout.num_experts, layout.num_slots
    if isinstance(init, (str, Path)):
        init = MergeCoefficients.load(init)
    if isinstance(init, MergeCoefficients):
        return _transfer(init, layout)
    if isinstance(init, Tensor):
        if init.shape != (K, S):
            raise ValueError(f"init tensor has shape {tuple(init.shape)}, expected (experts, slots) = ({K}, {S})")
        return init.detach().float().clone()
    if isinstance(init, (int, float)):
        return torch.full((K, S), float(init))
    if isinstance(init, Mapping):
        unknown = sorted(set(init) - set(layout.expert_names))
        missing = [e for e in layout.expert_names if e not in init]
        if unknown or missing:
            raise ValueError(f"init by expert name: unknown {unknown}, missing {missing}")
        init = [init[e] for e in layout.expert_names]
    per_expert = [float(v) for v in init]
    if len(per_expert) != K:
        raise ValueError(f"init has {len(per_expert)} values but there are {K} experts {list(layout.expert_names)}")
    return torch.tensor(per_expert).unsqueeze(1).expand(K, S).clone()


def _transfer(previous: MergeCoefficients, layout: CoefficientLayout) -> Tensor:
    """Start a new layout from earlier coefficients: each new slot gets the element-weighted
    mean of the earlier values over the entries it covers (task-wise → layer-wise, layer → chunk...)."""
    if tuple(previous.layout.expert_names) != tuple(layout.expert_names):
        raise ValueError(
            f"init coefficients are for experts {list(previous.layout.expert_names)}, "
            f"this merge has {list(layout.expert_names)}"
        )
    missing = [k for k in layout.keys if k not in previous.layout.tensor_slots]
    if missing:
        raise ValueError(f"init coefficients do not cover tensor {missing[0]!r} ({len(missing)} missing)")
    with torch.no_grad():
        values = previous()
        total = torch.zeros(layout.num_experts, layout.num_slots, dtype=torch.float64)
        weight = torch.zeros(layout.num_slots, dtype=torch.float64)
        for key, slots in layout.tensor_slots.items():
            rows = previous.row_values(key, values).double()
            per_row = layout.numels[key] / layout.rows[key]
            start = 0
            for slot, size in zip(slots, chunk_sizes(layout.rows[key], len(slots))):
                total[:, slot] += rows[:, start : start + size].sum(dim=1) * per_row
                weight[slot] += size * per_row
                start += size
    return (total / weight.clamp(min=1e-30)).float()
