"""Lightning's bars: evaluation names the task, learning counts steps; on a terminal every step
is drawn, in a log (stdout not a terminal) a bounded number of plain lines."""

from __future__ import annotations

import io
import sys
import warnings

import lightning as L
import pytest

from adamerge.io import terminal
from adamerge.learning.data import CalibrationData
from adamerge.learning.evaluation import evaluate
from adamerge.learning.learner import CoefficientLearner
from adamerge.learning.progress import StepProgressBar, TaskProgressBar
from adamerge.objectives import build_objective


@pytest.fixture(autouse=True)
def no_log_delay(monkeypatch):
    """Logs show these short runs' bars from the start (they would otherwise be done within the delay)."""
    monkeypatch.setattr(terminal, "LOG_DELAY_S", 0.0)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def fit_with_the_step_bar(mlp_problem, max_steps: int) -> None:
    """A tiny entropy fit of ``max_steps`` steps (about 10 batches an epoch) with the step bar on."""
    merged, tasks, data = mlp_problem()
    learner = CoefficientLearner(merged, tasks, build_objective("entropy"), lr=0.01)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, callbacks=[StepProgressBar()],
                        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(learner, datamodule=CalibrationData(data, batch_size=4))


def test_in_a_log_the_step_bar_writes_a_bounded_number_of_plain_lines(mlp_problem, capsys):
    fit_with_the_step_bar(mlp_problem, max_steps=100)  # 10 epochs: none of them adds a line
    out = capsys.readouterr().out  # Lightning's bars write to stdout; captured, it is no terminal
    lines = out.splitlines()
    assert "\r" not in out and all(line.startswith("learning coefficients:") for line in lines)
    assert 20 <= len(lines) <= 25
    assert "100/100" in lines[-1] and "train/loss" in lines[-1]


def test_on_a_terminal_the_step_bar_draws_every_step(mlp_problem, monkeypatch):
    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    fit_with_the_step_bar(mlp_problem, max_steps=30)
    drawn = screen.getvalue()
    assert "\r" in drawn and all(f" {n}/30 " in drawn for n in range(1, 31))


def test_the_evaluation_bar_description_names_the_task():
    names = ["sst2", "rte"]
    assert [TaskProgressBar.task_description(names, i) for i in range(2)] == ["evaluating sst2 (1/2)", "evaluating rte (2/2)"]


@pytest.mark.parametrize("trainer", ["one-device", "the fit trainer's step bar"])
def test_the_evaluation_bar_shows_task_names_not_dataloader_indices(tiny_merge, capsys, trainer):
    merged, tasks, data = tiny_merge()
    given = None if trainer == "one-device" else L.Trainer(
        accelerator="cpu", devices=1, logger=False, callbacks=[StepProgressBar()],
        enable_model_summary=False, enable_checkpointing=False)
    evaluate(merged, tasks, data, trainer=given)
    screen = capsys.readouterr().out
    assert "evaluating a (1/2)" in screen and "evaluating b (2/2)" in screen and "DataLoader" not in screen


def test_in_a_log_the_evaluation_bar_writes_a_few_lines_per_task(tiny_merge, capsys):
    merged, tasks, data = tiny_merge(sizes=(400, 240))  # 100 and 60 batches of 4
    evaluate(merged, tasks, data)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "\r" not in out and all(line.startswith("evaluating") for line in lines)
    for name, batches in (("a (1/2)", 100), ("b (2/2)", 60)):
        mine = [line for line in lines if line.startswith(f"evaluating {name}")]
        assert 20 <= len(mine) <= 22 and f"{batches}/{batches}" in mine[-1]
