"""One progress policy: a live bar on a terminal; in a log, a plain line every 5% and the last one,
never a line per update, and nothing from a bar done within its first seconds."""

from __future__ import annotations

import io
import sys

import pytest

from adamerge.io import terminal
from adamerge.io.terminal import LineStream, due, progress, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_sees_a_named_bar_and_the_items_pass_through(monkeypatch):
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    assert list(progress(range(5), "merging tensors", unit="tensor")) == [0, 1, 2, 3, 4]
    assert "merging tensors" in screen.getvalue() and "0/5" in screen.getvalue()  # the bar, with its total
    assert "\r" in screen.getvalue()  # redrawn in place


@pytest.fixture
def no_log_delay(monkeypatch):
    monkeypatch.setattr(terminal, "LOG_DELAY_S", 0.0)


def test_a_log_sees_a_line_every_five_percent_and_the_last(monkeypatch, no_log_delay):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    assert list(progress(range(1000), "FW-Merging", unit="iteration")) == list(range(1000))
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and all(line.startswith("FW-Merging:") for line in lines)
    assert 20 <= len(lines) <= 25
    counts = [line.split("|")[2].split()[0] for line in lines]
    assert counts[0] == "0/1000" and counts[-1] == "1000/1000"
    assert {f"{50 * k}/1000" for k in range(1, 21)} <= set(counts)  # every 5%


def test_a_log_sees_nothing_from_a_bar_done_within_its_first_seconds(monkeypatch):
    monkeypatch.setattr(terminal, "LOG_DELAY_S", 60.0)
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    assert list(progress(range(1000), "merging tensors")) == list(range(1000))
    assert log.getvalue() == ""


def test_a_log_sees_only_the_first_and_last_lines_of_a_bar_of_unknown_length(no_log_delay):
    log = io.StringIO()
    with progress_bar(None, "streaming", stream=log) as shown:
        for _ in range(500):
            shown.update(1)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "0it" in lines[0] and "500it" in lines[1]


def test_a_disabled_bar_writes_nothing():
    log = io.StringIO()
    with progress_bar(100, "progressive distillation", enabled=False, stream=log) as shown:
        shown.update(100)
    assert log.getvalue() == ""


def test_a_line_stream_turns_redraws_into_lines_without_blanks_or_repeats(no_log_delay):
    log = io.StringIO()
    lines = LineStream(log)
    for text in ("\rbar 1/3  ", "\rbar 2/3", "\rbar 2/3", "\r       \r", "\n", "\rbar 3/3\n"):
        lines.write(text)
    assert log.getvalue() == "bar 1/3\nbar 2/3\nbar 3/3\n"


def test_due_is_every_step_on_a_terminal_and_every_five_percent_in_a_log():
    assert all(due(n, 1000, Terminal()) for n in range(1, 1001))
    log = io.StringIO()
    assert [n for n in range(1, 1001) if due(n, 1000, log)] == list(range(50, 1001, 50))
    assert [n for n in range(1, 31) if due(n, 30, log)] == list(range(2, 31, 2))
    assert [n for n in range(1, 11) if due(n, 10, log)] == list(range(1, 11))  # each step is 10%
    assert [n for n in range(1, 100) if due(n, None, log)] == []  # unknown length: no lines in between
