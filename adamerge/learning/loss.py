"""The weighted task loss: ``Σ_task w_task · balance(objective(task outputs))`` on one set of
merged weights shared by every task.

One function for every learner (:class:`~adamerge.learning.learner.CoefficientLearner`, label-free
selection and FW-Merging), so a task weight or a ``task_balance`` means the same everywhere.
A penalty on the coefficients is not part of it: only the coefficient learner has coefficients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor

from adamerge.objectives import Objective, split_loss
from adamerge.objectives.balance import BALANCES
from adamerge.tasks.base import Task


class TaskLoss:
    """The weighted, balanced sum of the tasks' losses under ``objective``.

    ``task_weights`` default to 1 (unknown task names are an error); ``task_balance`` is one of
    :mod:`adamerge.objectives.balance`; ``initial`` holds each task's starting loss for the
    balances that need it (set by whoever measures it: see :meth:`mean_losses`).
    """

    def __init__(
        self,
        tasks: Mapping[str, Task],
        objective: Objective,
        task_weights: Mapping[str, float] | None = None,
        task_balance: str = "sum",
        guard_weight: float = 4.0,
    ):
        unknown = sorted(set(task_weights or {}) - set(tasks))
        if unknown:
            raise KeyError(f"task_weights names unknown task(s) {unknown}; tasks are {sorted(tasks)}")
        self.tasks, self.objective = tasks, objective
        self.weights = {name: float((task_weights or {}).get(name, 1.0)) for name in tasks}
        self.balance = BALANCES.get(task_balance)
        self.task_balance, self.guard_weight = task_balance, guard_weight
        self.initial: dict[str, float] | None = None

    def balanced(self, loss: Tensor, task: str, reference: Mapping[str, float] | None = None) -> Tensor:
        """The task's loss on the scale of ``task_balance``, against ``reference`` (default: ``initial``)."""
        if self.balance.non_negative and bool(loss.detach() < 0):
            raise ValueError(
                f"task_balance {self.task_balance!r} needs a non-negative objective; task {task!r} has loss {float(loss):.4g}"
            )
        start = (reference or self.initial)[task] if self.balance.needs_start else None
        return self.balance.fn(loss, start, self.guard_weight)

    def terms(self, model, params: Mapping[str, Tensor], batch: Mapping[str, Mapping]) -> Iterator[tuple[str, Tensor, Tensor, dict]]:
        """``(task, weighted balanced loss, raw loss, the objective's logs)`` per task of a
        ``{task: batch}`` step, one task at a time (a caller may backward each before the next)."""
        for name, task_batch in batch.items():
            output = self.tasks[name](model, params, task_batch, self.objective.hidden_layers)
            loss, logs = split_loss(self.objective(output, task_batch, name))
            yield name, self.weights[name] * self.balanced(loss, name), loss, logs

    def __call__(self, model, params: Mapping[str, Tensor], batch: Mapping[str, Mapping]) -> Tensor:
        total: Tensor | float = 0.0
        for _, weighted, _, _ in self.terms(model, params, batch):
            total = total + weighted
        return total

    @torch.no_grad()
    def mean_losses(
        self, model, params: Mapping[str, Tensor], objective: Objective, batches_for: Callable[[str], Iterable]
    ) -> dict[str, float]:
        """Each task's mean (unweighted, unbalanced) loss under ``objective`` over ``batches_for(task)``."""
        means = {}
        for name, task in self.tasks.items():
            losses = [float(split_loss(objective(task(model, params, b, objective.hidden_layers), b, name))[0]) for b in batches_for(name)]
            if not losses:
                raise ValueError(f"task {name!r} has no rows to measure the objective on (is selection.holdout > 0?)")
            means[name] = sum(losses) / len(losses)
        return means
