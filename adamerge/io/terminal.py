"""Progress, one policy for every bar: a live tqdm bar where a person watches (the stream is a
terminal); in logs, CI and tests a plain line every 5% of the way and the last one, never a line
per update, and nothing at all from a bar done within its first seconds (a quick evaluation or
merge). The loops outside Lightning (data-free merges, FW-Merging, progressive distillation) take
their bar from :func:`progress_bar` / :func:`progress`; Lightning's bars (``learning.progress``)
follow the same policy through :func:`bar_stream` and :func:`due`."""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

from tqdm import tqdm

T = TypeVar("T")

LINES_PER_BAR = 20  # away from a terminal: a line every 5% of the way
LOG_DELAY_S = 2.0  # ... from the moment a bar has run this long


def is_terminal(stream: IO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def every(total: int | float | None) -> float:
    """Away from a terminal, a bar of ``total`` steps writes a line every this many steps
    (of unknown length: no line between its first and its last)."""
    if not total or math.isinf(total):
        return math.inf
    return max(1, math.ceil(total / LINES_PER_BAR))


def due(n: int, total: int | float | None, stream: IO) -> bool:
    """Whether a bar writing to ``stream`` shows step ``n``: every step on a terminal, else
    every 5% of ``total`` and the last step."""
    return is_terminal(stream) or n == total or n % every(total) == 0


class LineStream:
    """A log's view of a tqdm bar: each redraw (a carriage return, then the bar) becomes one line;
    blank redraws (a bar clearing itself), repeats of the line before and whatever comes in the
    first ``LOG_DELAY_S`` seconds are dropped."""

    def __init__(self, stream: IO):
        self.stream, self.last = stream, None
        self.quiet_until = time.monotonic() + LOG_DELAY_S

    def write(self, text: str) -> int:
        if time.monotonic() < self.quiet_until:
            return len(text)
        for part in re.split(r"[\r\n]", text):
            line = part.rstrip()
            if line and line != self.last:
                self.stream.write(line + "\n")
                self.last = line
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def bar_stream(stream: IO) -> IO:
    """Where a tqdm bar meant for ``stream`` writes: ``stream`` itself on a terminal, else its lines."""
    return stream if is_terminal(stream) else LineStream(stream)


def progress_bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True, stream: IO | None = None) -> tqdm:
    """A bar of ``total`` steps named ``desc`` on ``stream`` (default: stderr), by the policy above."""
    stream = stream or sys.stderr
    if is_terminal(stream):
        return tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True, leave=False, disable=not enabled)
    # the steps decide when a line is written: no time-based refresh, no monitor thread resetting miniters
    return tqdm(total=total, desc=desc, unit=unit, file=LineStream(stream), disable=not enabled, leave=True,
                miniters=every(total), mininterval=0, maxinterval=math.inf)


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """``items``, with a bar named ``desc`` on stderr."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with progress_bar(total, desc, unit) as shown:
        for item in items:
            yield item
            shown.update(1)
