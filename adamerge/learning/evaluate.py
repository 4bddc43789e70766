"""Per-task evaluation through Lightning: the Trainer that learned the coefficients (its
loggers and processes: DDP, ``ddp_spawn``) or a one-device Trainer where the weights already
are (data-free merges, progressive and FW-Merging runs, re-evaluation); and the label check
that runs before training.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping

import lightning as L
import torch
from torch import Tensor

from adamerge.core.merged import FunctionalModel
from adamerge.learning.evaluation import ParamsFor, TaskEvaluation, take_results
from adamerge.learning.progress import TaskProgressBar
from adamerge.tasks.base import Task


def evaluate(
    model: FunctionalModel,
    tasks: Mapping[str, Task],
    data,
    params: Mapping[str, Tensor] | ParamsFor | None = None,
    names: Iterable[str] | None = None,
    trainer: L.Trainer | None = None,
) -> dict[str, dict]:
    """Evaluate every task of ``data.evaluation`` (or ``names``) with the current merge, fixed
    ``params``, or ``params(task)``; ``trainer`` (default: one device) runs it as a test."""
    names = list(names if names is not None else data.evaluation)
    if not names:
        return {}
    trainer = trainer or evaluation_trainer(model, params)
    trainer.test(TaskEvaluation(model, tasks, data, names, params), verbose=False)
    return take_results(trainer.callback_metrics, names)


def evaluation_trainer(model: FunctionalModel, params=None) -> L.Trainer:
    """One device, the one the weights are on (``params``', else the model's); no logs or checkpoints
    of its own; on a terminal, a progress bar naming the task it evaluates."""
    tensors = list(params.values()) if isinstance(params, Mapping) else []
    tensors += [p for p in model.parameters() if not p.is_meta]
    device = tensors[0].device if tensors else torch.device("cpu")
    accelerator = {"cuda": "gpu"}.get(device.type, device.type)
    terminal = sys.stderr.isatty()
    return L.Trainer(
        accelerator=accelerator,
        devices=[device.index or 0] if device.type == "cuda" else 1,
        logger=False,
        callbacks=[TaskProgressBar()] if terminal else [],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=terminal,
    )


def _labels(dataset) -> list[int] | None:
    """A dataset's integer class labels (a ``label`` column or list rows), or None if it has none."""
    if hasattr(dataset, "column_names"):
        labels = dataset.with_format(None)["label"] if "label" in dataset.column_names else None
    elif isinstance(dataset, list):
        labels = [row["label"] for row in dataset if isinstance(row, Mapping) and "label" in row] or None
    else:
        return None
    return labels if labels is not None and all(isinstance(v, int) for v in labels) else None


@torch.no_grad()
def check_labels(model: FunctionalModel, tasks: Mapping[str, Task], data) -> None:
    """Every label of each task's calibration and evaluation rows within its head's classes,
    checked before training: a bad one would otherwise fail the evaluation at the very end."""
    params, device = model.base_tensors(), next(model.backbone.parameters()).device
    skeleton = device.type == "meta"  # a streamed run's backbone: no forward before training, heads say their size
    for split, datasets, batches in (
        ("calibration", data.calibration, data.calibration_batches),
        ("evaluation", data.evaluation, data.evaluation_batches),
    ):
        for name, dataset in datasets.items():
            labels = _labels(dataset)
            if not labels or name not in tasks:
                continue
            if skeleton:
                classes = getattr(tasks[name], "num_labels", None)
                if classes is None:
                    continue
            else:
                batch = next(iter(batches(name, 1)))  # one row tells the head's size
                batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                classes = tasks[name](model, params, batch).logits.shape[-1]
            bad = next((v for v in labels if not 0 <= v < classes), None)
            if bad is not None:
                raise ValueError(
                    f"task {name!r}: {split} label {bad} is outside its head's {classes} classes (0..{classes - 1})"
                )


def average_accuracy(results: Mapping[str, Mapping]) -> float | None:
    values = [r["accuracy"] for r in results.values() if "accuracy" in r]
    return sum(values) / len(values) if values else None
