"""Long loops outside Lightning show a bar on a terminal and stay silent in logs and CI."""

from __future__ import annotations

import io
import sys

from adamerge.io.terminal import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_sees_a_named_bar_and_the_items_pass_through(monkeypatch):
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    assert list(progress(range(5), "merging tensors", unit="tensor")) == [0, 1, 2, 3, 4]
    assert "merging tensors" in screen.getvalue() and "0/5" in screen.getvalue()  # the bar, with its total


def test_a_log_sees_nothing(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    assert list(progress(iter("abc"), "FW-Merging")) == ["a", "b", "c"]
    assert log.getvalue() == ""
