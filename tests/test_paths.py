"""The cache root: ``$ADAMERGE_CACHE`` when set (and not empty), else ``~/.cache/adamerge``."""

from __future__ import annotations

from pathlib import Path

from adamerge.io.paths import cache_root


def test_the_environment_names_the_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAMERGE_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    for unset in (lambda: monkeypatch.setenv("ADAMERGE_CACHE", ""), lambda: monkeypatch.delenv("ADAMERGE_CACHE")):
        unset()
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        assert cache_root() == Path(tmp_path / "home" / ".cache" / "adamerge")
