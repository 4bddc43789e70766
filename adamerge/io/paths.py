"""Where adamerge keeps what it builds (zoos, datasets' caches): one place for the cache root."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$ADAMERGE_CACHE``, defaulting to ``~/.cache/adamerge``; the built-in zoos live under ``zoo/``."""
    return Path(os.environ.get("ADAMERGE_CACHE") or Path.home() / ".cache" / "adamerge")
