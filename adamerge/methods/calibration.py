"""What a data-driven merge runs the experts on: the calibration inputs of their own tasks.

RegMean and Fisher merging weigh each expert by what it computes on a few unlabelled inputs of
its own task, so besides the weights they need the model to run and the inputs. A method marked
with :func:`data_driven` takes a keyword ``calibration``: a :class:`Calibration` holding the
backbone whose weights are merged, each task's runner (``task(model, params, batch)``, whose
output has ``logits``) and each task's calibration batches. ``adamerge merge`` builds it from the
problem and its calibration data (methods know nothing of recipes); expert ``k`` runs on the task
of its name, and a task without calibration data is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

from adamerge.core.merged import FunctionalModel

Batches = Callable[[], Iterable[Mapping[str, Any]]]


def data_driven(method: Callable) -> Callable:
    """Mark a merge method as one that runs the experts on calibration inputs (``calibration=``)."""
    method.needs_calibration = True
    return method


def needs_calibration(method: Callable) -> bool:
    """Whether ``method`` is :func:`data_driven`."""
    return getattr(method, "needs_calibration", False)


@dataclass
class Calibration:
    """The backbone whose weights are merged (``nn.Linear`` modules and parameter names as in the
    merge scope), ``tasks`` (name → ``task(model, params, batch)``) and ``batches`` (name → a
    callable giving that task's calibration batches, for the tasks that have some), run on ``device``."""

    backbone: nn.Module
    tasks: Mapping[str, Callable[..., Any]]
    batches: Mapping[str, Batches]
    device: torch.device | str = "cpu"
    model: FunctionalModel = field(init=False, repr=False)
    _base: dict[str, Tensor] | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.device = torch.device(self.device)
        self.model = FunctionalModel(self.backbone)

    def check(self, experts: Iterable[str], method: str) -> None:
        """Every expert has a task of its name with calibration data; else a one-line error naming it."""
        for name in experts:
            if name not in self.tasks:
                raise ValueError(f"expert {name!r} has no task of its name: {method} runs each expert on its own "
                                 "task's calibration inputs")
            if name not in self.batches:
                raise ValueError(f"task {name!r} has no calibration data (problem.tasks.{name}.calibration): "
                                 f"{method} runs each expert on its own task's unlabelled inputs")

    def params(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Every tensor of the backbone on the device, ``tensors`` in place of its own."""
        if self._base is None:
            self._base = {k: v.to(self.device) for k, v in self.model.base_tensors().items()}
        return {**self._base, **{k: v.to(self.device) for k, v in tensors.items()}}

    def inputs(self, task: str, limit: int) -> Iterator[Mapping[str, Any]]:
        """The first ``limit`` calibration batches of ``task``, on the device."""
        if limit < 1:
            raise ValueError(f"batches must be >= 1, got {limit}")
        runner = self.tasks[task]
        if isinstance(runner, nn.Module):
            runner.to(self.device)
        for batch in islice(self.batches[task](), limit):
            yield {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def logits(self, task: str, params: Mapping[str, Tensor], batch: Mapping[str, Any]) -> Tensor:
        """``task``'s logits for ``batch`` with ``params`` swapped into the backbone."""
        return self.tasks[task](self.model, params, batch).logits


def rows(batch: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """``batch`` one sample at a time: every tensor with the batch's leading size sliced to one row."""
    size = next(v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0)
    for i in range(size):
        yield {k: v[i:i + 1] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == size else v
               for k, v in batch.items()}


def input_grams(calibration: Calibration, task: str, params: Mapping[str, Tensor], modules: Iterable[str],
                limit: int) -> dict[str, Tensor]:
    """Module name → ``XᵀX / N``: the mean Gram of the inputs each named ``nn.Linear`` receives (``X``
    its ``N`` input rows, every position of every sample) while ``task``'s first ``limit`` calibration
    batches run with ``params``; a module the task never reaches is left out."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str) -> Callable:
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    handles = [calibration.backbone.get_submodule(name).register_forward_pre_hook(hook(name)) for name in modules]
    try:
        with torch.no_grad():
            for batch in calibration.inputs(task, limit):
                calibration.logits(task, params, batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / counts[name] for name, total in sums.items()}
