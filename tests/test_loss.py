"""The task loss every learner shares, against each task's objective computed on its own: task
weights, the balances (``initial`` divides by each task's measured starting loss), one term per
task in the batch, a negative loss refused by a balance that needs a non-negative one."""

from __future__ import annotations

import pytest
import torch

from adamerge.learning.loss import TaskLoss
from adamerge.objectives import build_objective


@pytest.fixture
def problem(mlp_problem):
    """The tiny MLP merge, its merged parameters (no gradient needed here) and a 5-row batch per task."""
    merged, tasks, data = mlp_problem()
    batch = {n: {"inputs": torch.stack([r["inputs"] for r in data[n][:5]]), "index": torch.arange(5)} for n in tasks}
    with torch.no_grad():
        params = merged.merged_parameters()
    return merged, tasks, params, batch


@torch.no_grad()
def by_hand(objective, merged, tasks, params, batch) -> dict[str, float]:
    """Each task's objective on its own batch, without TaskLoss."""
    return {n: float(objective(tasks[n](merged, params, batch[n]), batch[n], n)) for n in batch}


def test_the_total_is_the_weighted_sum_of_each_tasks_loss(problem):
    merged, tasks, params, batch = problem
    entropy = build_objective("entropy")
    each = by_hand(entropy, merged, tasks, params, batch)
    loss = TaskLoss(tasks, entropy, task_weights={"t0": 2.5})
    assert float(loss(merged, params, batch)) == pytest.approx(2.5 * each["t0"] + each["t1"], rel=1e-6)
    terms = {name: (float(weighted), float(raw)) for name, weighted, raw, _ in loss.terms(merged, params, {"t1": batch["t1"]})}
    assert terms == {"t1": (pytest.approx(each["t1"], rel=1e-6), pytest.approx(each["t1"], rel=1e-6))}  # only the batch's tasks
    with pytest.raises(KeyError, match=r"task_weights names unknown task\(s\) \['t9'\]; tasks are \['t0', 't1'\]"):
        TaskLoss(tasks, entropy, task_weights={"t9": 1.0})


def test_initial_balance_divides_by_the_measured_starting_losses(problem):
    merged, tasks, params, batch = problem
    entropy = build_objective("entropy")
    loss = TaskLoss(tasks, entropy, task_balance="initial")
    halves = {n: [{k: v[:2] for k, v in batch[n].items()}, {k: v[2:] for k, v in batch[n].items()}] for n in tasks}
    start = loss.mean_losses(merged, params, entropy, lambda n: halves[n])
    for name in tasks:
        parts = [by_hand(entropy, merged, tasks, params, {name: half})[name] for half in halves[name]]
        assert start[name] == pytest.approx(sum(parts) / 2, rel=1e-6)
    loss.initial = start
    each = by_hand(entropy, merged, tasks, params, batch)
    assert float(loss(merged, params, batch)) == pytest.approx(sum(each[n] / start[n] for n in tasks), rel=1e-6)
    with pytest.raises(ValueError, match="task 't0' has no rows to measure the objective on"):
        loss.mean_losses(merged, params, entropy, lambda n: [])


def test_a_balance_that_needs_non_negative_losses_refuses_a_negative_one(problem):
    merged, tasks, params, batch = problem
    loss = TaskLoss(tasks, build_objective("infomax", diversity_weight=10.0), task_balance="log")
    with pytest.raises(ValueError, match=r"task_balance 'log' needs a non-negative objective; task 't0' has loss -"):
        loss(merged, params, batch)
