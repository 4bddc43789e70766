"""``chunk``: ``m`` coefficients per tensor, each over a contiguous chunk of rows (Expert Merging++).

``chunks`` is an int for every tensor or a map from exact name or regex to ``m`` (unlisted
tensors get 1, the same as ``layer``); ``m = 0`` keeps that tensor's coefficient at its
initial value. :func:`adamerge.core.importance.resolve_chunks` allocates ``m`` by importance.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Union

from adamerge.core.granularities.registry import Shapes, SlotsOf, register_granularity

ChunkSpec = Union[int, Mapping[str, int], None]


@register_granularity("chunk")
def chunk(shapes: Shapes, chunks: ChunkSpec = None) -> SlotsOf:
    count = _chunk_counts(chunks, shapes)

    def slots(key: str) -> tuple[str, ...]:
        m, rows = count(key), (int(shapes[key][0]) if len(shapes[key]) else 1)
        if m > rows:
            raise ValueError(f"chunks for {key!r}: m={m} exceeds its first dimension ({rows})")
        return (key,) if m == 1 else tuple(f"{key}[{j}/{m}]" for j in range(m))

    return slots


def _chunk_counts(chunks: ChunkSpec, shapes: Shapes):
    """``key -> m`` for an int or a ``{name or regex: m}`` map (exact names first)."""
    given = {"": chunks} if isinstance(chunks, int) else dict(chunks or {})
    for value in given.values():
        if int(value) < 0:
            raise ValueError(f"chunk counts must be >= 0, got {value}")
    if isinstance(chunks, int):
        return lambda key: chunks
    exact = {k: int(v) for k, v in given.items() if k in shapes}
    patterns = [(re.compile(k), int(v)) for k, v in given.items() if k not in shapes]
    return lambda key: exact[key] if key in exact else next((m for p, m in patterns if p.search(key)), 1)
