"""Coefficient layouts: which coefficient slot(s) each merged tensor reads.

One slot for the whole model (``task``), one per tensor (``layer``), one per group of tensors
(``group``), ``m`` slots per tensor, each covering a contiguous chunk of rows (``chunk``), or
one slot per tensor holding a value per entry (``element``, see :mod:`adamerge.core.element`).
Every slot holds one value per expert, so all coefficients together are a ``[K, S]`` matrix.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Union


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
