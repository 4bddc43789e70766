"""Coefficient layouts: which coefficient slot(s) each merged tensor reads.

A registered granularity rule (:mod:`adamerge.core.granularities`) names each tensor's slots:
one for the whole model (``task``), one per tensor (``layer``), one per group of tensors
(``group``), ``m`` per tensor over contiguous row chunks (``chunk``), one per tensor holding
a value per entry (``element``, see :mod:`adamerge.core.element`), or one per singular component
of a matrix (``spectral``, see :mod:`adamerge.core.spectral`). Every slot holds one value per
expert, so all coefficients together are a ``[K, S]`` matrix.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from adamerge.core.granularities import GRANULARITIES, misplaced_options

Granularity = str  # the name of a registered granularity


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


def build_layout(
    expert_names: Sequence[str],
    shapes: Mapping[str, Sequence[int]],
    granularity: Granularity = "layer",
    *,
    freeze: str | Sequence[str] | None = None,
    **options,
) -> CoefficientLayout:
    """Lay out coefficient slots for tensors of the given shapes, as ``granularity``'s rule says.

    ``options`` go to that rule (``groups=`` for ``group``, ``chunks=`` for ``chunk``; see their
    modules); an option another granularity takes is refused, naming it. ``freeze``: regexes of
    tensors whose coefficients stay at their initial value. Slots are numbered in order of
    first use, tensor by tensor.
    """
    rule = GRANULARITIES.get(granularity)
    problems = misplaced_options(granularity, options)
    if problems:
        raise ValueError(problems[0])
    slots_of = rule.build(shapes, **{k: v for k, v in options.items() if v is not None})
    freeze_patterns = [re.compile(p) for p in ([freeze] if isinstance(freeze, str) else freeze or [])]
    rows = {k: (int(s[0]) if len(s) else 1) for k, s in shapes.items()}
    slot_names: dict[str, int] = {}  # name -> slot, in order of first use
    frozen: set[int] = set()
    tensor_slots: dict[str, tuple[int, ...]] = {}
    for key in shapes:
        names = () if any(p.search(key) for p in freeze_patterns) else tuple(slots_of(key))
        if len(names) > max(rows[key], 1):  # a chunk per row at most
            raise ValueError(f"granularity {granularity!r} gives {key!r} {len(names)} slots but it has {rows[key]} rows")
        if not names:
            names = (f"{key} (frozen)",)
            frozen.add(slot_names.setdefault(names[0], len(slot_names)))
        tensor_slots[key] = tuple(slot_names.setdefault(name, len(slot_names)) for name in names)
    return CoefficientLayout(
        expert_names=tuple(expert_names),
        granularity=granularity,
        slot_names=tuple(slot_names),
        tensor_slots=tensor_slots,
        rows=rows,
        numels={k: math.prod(int(d) for d in s) for k, s in shapes.items()},
        frozen=frozenset(frozen),
    )
