"""What the benchmark zoos share: where they live, how a finished expert is recognised, threads.

Each zoo writes an expert into a hidden staging folder and renames it into place when complete;
``adamerge_expert.json`` is written last, so an expert folder counts as finished only when it
holds that file (with the zoo's format and the settings it was trained with), its config and
its weights.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from adamerge.io.paths import cache_root

EXPERT_META = "adamerge_expert.json"
ZOO_META = "zoo.json"


def zoo_path(name: str) -> Path:
    """``$ADAMERGE_CACHE/zoo/<name>`` (``ADAMERGE_CACHE`` defaults to ``~/.cache/adamerge``)."""
    return cache_root() / "zoo" / name


def read_expert_meta(expert_dir: str | os.PathLike) -> dict:
    """An expert's ``adamerge_expert.json``."""
    return json.loads((Path(expert_dir).expanduser() / EXPERT_META).read_text())


def is_complete_expert(expert_dir: str | os.PathLike, zoo_format: str, settings: Mapping | None = None) -> bool:
    """Whether ``expert_dir`` holds a finished expert of ``zoo_format`` (metadata, config and
    weights), trained with ``settings`` (a subset of the recorded ``train`` settings) when given."""
    expert_dir = Path(expert_dir).expanduser()
    try:
        meta = read_expert_meta(expert_dir)
    except (OSError, ValueError):
        return False
    if meta.get("format") != zoo_format or meta.get("kind") != "expert":
        return False
    if not (expert_dir / "config.json").is_file() or not (expert_dir / "model.safetensors").is_file():
        return False
    recorded = meta.get("train", {})
    return not any(recorded.get(k) != v for k, v in (settings or {}).items())


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[int]:
    """torch's CPU threads set to ``num_threads`` (default: the cores this process may use) for
    the block, restored after it."""
    previous = torch.get_num_threads()
    wanted = int(num_threads) if num_threads else min(previous, available_cores())
    torch.set_num_threads(max(1, wanted))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
