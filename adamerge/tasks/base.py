"""Tasks: how a batch of one task's inputs becomes that task's logits through the merged backbone.

A task never owns merged weights; it receives the model to run (any
:class:`~adamerge.core.merged.FunctionalModel`, usually the ``MergedModel``) and the merged tensors
of the current step (``params``), so every task in a step shares one merge. The same call with an expert's
weights (``merged.expert_parameters(k)``) gives that expert's outputs, which is how
alignment objectives get their targets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from adamerge.core.merged import FunctionalModel


@dataclass
class TaskOutput:
    """What a task produced for one batch.

    ``logits`` has one row per prediction (``[N, C]``; for language models, one row per
    predicted token, and ``sample_rows`` says how many rows each sample produced); ``labels``
    holds the matching targets when the batch has them (used by evaluation and supervised
    objectives only). ``hidden``
    maps a requested layer index to ``[B, T, H]`` (or ``[B, H]``) activations, and ``mask``
    (``[B, T]``, optional) marks the valid positions.
    """

    logits: Tensor
    hidden: dict[int, Tensor] = field(default_factory=dict)
    mask: Tensor | None = None
    sample_rows: Tensor | None = None
    labels: Tensor | None = None


class Task(nn.Module):
    """One task of a merge. Subclasses implement :meth:`forward`."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(
        self, merged: FunctionalModel, params: Mapping[str, Tensor], batch: Mapping, hidden_layers: Sequence[int] = ()
    ) -> TaskOutput:
        raise NotImplementedError


class HeadTask(Task):
    """A plain ``nn.Module`` backbone plus this task's own frozen head.

    ``merged.forward_with(params, batch[input_key])`` gives features; ``head`` maps them to
    logits. ``hidden_modules`` names backbone submodules whose outputs count as hidden
    layers ``0, 1, ...`` for alignment objectives (captured with forward hooks).
    """

    def __init__(
        self,
        name: str,
        head: nn.Module | None = None,
        input_key: str = "inputs",
        hidden_modules: Sequence[str] = (),
    ):
        super().__init__(name)
        self.head = head.requires_grad_(False).eval() if head is not None else nn.Identity()
        self.input_key = input_key
        self.hidden_modules = list(hidden_modules)

    def forward(self, merged, params, batch, hidden_layers=()):
        captured: dict[int, Tensor] = {}
        handles = []
        for index in hidden_layers:
            if index >= len(self.hidden_modules):
                raise IndexError(
                    f"task {self.name!r}: hidden layer {index} requested but only {len(self.hidden_modules)} "
                    "hidden_modules are named"
                )
            module = merged.backbone.get_submodule(self.hidden_modules[index])
            handles.append(module.register_forward_hook(_capture(captured, index)))
        try:
            features = merged.forward_with(params, batch[self.input_key])
        finally:
            for handle in handles:
                handle.remove()
        return TaskOutput(logits=self.head(features), hidden=captured, labels=batch.get("labels"))

    def train(self, mode: bool = True) -> "HeadTask":
        super().train(mode)
        self.head.eval()
        return self


def _capture(store: dict[int, Tensor], index: int) -> Callable:
    def hook(module, inputs, output):
        store[index] = output[0] if isinstance(output, tuple) else output

    return hook
