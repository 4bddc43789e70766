"""Progress on a terminal: a bar where a person watches (stderr is a terminal), nothing in logs,
tests and CI. Long loops outside Lightning (data-free merges over many tensors, FW-Merging's
iterations) report through this."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """``items``, with a tqdm bar named ``desc`` on a terminal."""
    if not sys.stderr.isatty():
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)
