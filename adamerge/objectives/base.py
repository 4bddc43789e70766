"""The objective protocol, the objective registry and how a recipe's objectives are built.

Kept apart from the package's ``__init__`` so that the objective modules (which register
themselves here) import it without importing the package that imports them.

An objective is an ``nn.Module`` with three hooks:

- ``forward(output, batch, task) -> loss`` (or ``(loss, logs)``): the loss of one task's batch,
  given that task's :class:`~adamerge.tasks.base.TaskOutput` from the merged model;
- ``setup(context)`` (optional): precompute what the loss needs once, e.g. expert targets;
- ``penalty(merged)`` (optional): a term on the coefficients themselves, added once per step.

``hidden_layers`` lists the hidden layers the objective reads (the task then returns them).
A plain function ``fn(output, batch, task) -> loss`` works too: register it and it is wrapped.
Recipes name objectives by registered name or by dotted path (``mypkg.losses:MyLoss``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from adamerge.core.merged import MergedModel
from adamerge.core.registry import Registry
from adamerge.tasks.base import Task, TaskOutput

LossAndLogs = tuple[Tensor, Mapping[str, Tensor]]


@dataclass
class ObjectiveContext:
    """What an objective may use in ``setup``: the merged model, the tasks and their calibration data.

    ``calibration_batches(task)`` yields collated batches of that task's calibration set in order,
    each with an ``"index"`` entry holding the rows' positions in the set.
    """

    merged: MergedModel
    tasks: Mapping[str, Task]
    calibration_batches: Callable[[str], Any]
    device: torch.device


class Objective(nn.Module):
    """Base class for objectives; override ``forward`` and, when needed, ``setup``/``penalty``."""

    hidden_layers: tuple[int, ...] = ()
    # a score of labelled rows with no gradient (accuracy): only a derivative-free search
    # (optimizer cmaes) minimises it, on each task's validation rows
    scores_validation: bool = False

    def setup(self, context: ObjectiveContext) -> None:
        """Precompute anything the loss needs (called once before training)."""

    def forward(self, output: TaskOutput, batch: Mapping, task: str) -> Tensor | LossAndLogs:
        raise NotImplementedError

    def penalty(self, merged: MergedModel) -> Tensor | None:
        """A loss on the coefficients, added once per step (None for none)."""
        return None


class FunctionObjective(Objective):
    """Wraps a plain ``fn(output, batch, task) -> loss``."""

    def __init__(self, fn: Callable[..., Tensor | LossAndLogs], **kwargs: Any):
        super().__init__()
        self.fn, self.kwargs = fn, kwargs

    def forward(self, output, batch, task):
        return self.fn(output, batch, task, **self.kwargs)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


class WeightedObjectives(Objective):
    """``Σ_i w_i · objective_i``: several objectives combined in one recipe."""

    def __init__(self, objectives: Sequence[tuple[float, Objective]], names: Sequence[str] | None = None):
        super().__init__()
        self.weights = [float(w) for w, _ in objectives]
        self.parts = nn.ModuleList([o for _, o in objectives])
        self.names = list(names) if names is not None else [type(o).__name__.lower() for o in self.parts]
        self.hidden_layers = tuple(sorted({i for o in self.parts for i in o.hidden_layers}))

    def setup(self, context):
        for part in self.parts:
            part.setup(context)

    def forward(self, output, batch, task):
        total, logs = 0.0, {}
        for name, weight, part in zip(self.names, self.weights, self.parts):
            loss, part_logs = split_loss(part(output, batch, task))
            total = total + weight * loss
            logs[name] = loss.detach()
            logs.update({f"{name}/{k}": v for k, v in part_logs.items()})
        return total, logs

    def penalty(self, merged):
        terms = [w * p for w, part in zip(self.weights, self.parts) if (p := part.penalty(merged)) is not None]
        return sum(terms) if terms else None


def split_loss(result: Tensor | LossAndLogs) -> LossAndLogs:
    """Normalise an objective's return value to ``(loss, logs)``."""
    if isinstance(result, tuple):
        loss, logs = result
        return loss, dict(logs)
    return result, {}


OBJECTIVES: Registry[Callable[..., Any]] = Registry("objective", dotted_paths=True)
"""Objectives by name: an :class:`Objective` subclass or a plain loss function, added with
``@OBJECTIVES.register("name")``; ``get`` also imports a dotted path ``package.module:Name``."""


def build_objective(name: str, **args: Any) -> Objective:
    """Instantiate an objective by name with its arguments; a wrong argument is named in the error."""
    target = OBJECTIVES.get(name)
    if inspect.isclass(target) and issubclass(target, nn.Module):
        _check_arguments(name, target.__init__, args, skip=1)
        return target(**args)
    if callable(target):
        _check_arguments(name, target, args, skip=3)
        return FunctionObjective(target, **args)
    raise TypeError(f"objective {name!r} is neither an Objective class nor a function")


def _check_arguments(name: str, fn: Callable, args: Mapping[str, Any], skip: int) -> None:
    parameters = list(inspect.signature(fn).parameters.values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return
    known = {p.name for p in parameters}
    unknown = sorted(set(args) - known)
    if unknown:
        raise TypeError(f"objective {name!r} got unknown argument(s) {unknown}; it accepts {sorted(known)}")
