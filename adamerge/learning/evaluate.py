"""Per-task evaluation with torchmetrics, plus collapse diagnostics that need no labels.

Besides accuracy and the mean cross-entropy (when labels exist; and perplexity, its
exponential, for language models' tokens) every task reports its prediction histogram, the
mean per-sample entropy and the entropy of the mean prediction: a merge that collapses
onto one class shows a histogram with one spike and a near-zero mean-prediction entropy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from adamerge.core.merged import FunctionalModel
from adamerge.objectives.entropy import prediction_entropy
from adamerge.tasks.base import Task

ParamsFor = Callable[[str], Mapping[str, Tensor]]
_HISTOGRAM_MAX_CLASSES = 100


@torch.no_grad()
def evaluate_task(
    merged: FunctionalModel, task: Task, batches: Iterable[Mapping], params: Mapping[str, Tensor], device=None
) -> dict[str, float | list[int]]:
    """Accuracy (if labelled), prediction histogram and entropies of one task."""
    device = device or next(iter(params.values()), next(merged.backbone.parameters())).device  # a skeleton's are on meta
    accuracy: MulticlassAccuracy | None = None
    counts: Tensor | None = None
    probability_sum: Tensor | None = None
    entropy_sum, rows = 0.0, 0
    nll_sum, language_model = 0.0, False
    for batch in batches:
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        output = task(merged, params, batch)
        logits = output.logits.float()
        classes = logits.shape[-1]
        if counts is None:
            counts = torch.zeros(classes, dtype=torch.long, device=device)
            probability_sum = torch.zeros(classes, device=device)
        predictions = logits.argmax(dim=-1)
        counts += torch.bincount(predictions, minlength=classes)
        probability_sum += logits.softmax(dim=-1).sum(dim=0)
        entropy_sum += float(prediction_entropy(logits).sum())
        rows += logits.shape[0]
        labels = output.labels
        language_model = language_model or output.sample_rows is not None
        if labels is not None:
            nll_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            if accuracy is None:
                accuracy = MulticlassAccuracy(num_classes=classes, average="micro").to(device)
            accuracy.update(predictions, labels)
    if rows == 0:
        raise ValueError(f"task {task.name!r}: no evaluation rows")
    mean_prediction = probability_sum / rows
    result: dict[str, float | list[int]] = {
        "samples": rows,
        "entropy": entropy_sum / rows,
        "mean_prediction_entropy": float(prediction_entropy(mean_prediction.log().unsqueeze(0))[0]),
        "max_entropy": math.log(counts.numel()),
    }
    if accuracy is not None:
        result["accuracy"] = float(accuracy.compute())
        result["loss"] = nll_sum / rows  # mean cross-entropy of the labelled rows (tokens, for a language model)
        if language_model:
            result["perplexity"] = math.exp(result["loss"])
    if counts.numel() <= _HISTOGRAM_MAX_CLASSES:
        result["histogram"] = counts.tolist()
    return result


def evaluate(
    merged: FunctionalModel,
    tasks: Mapping[str, Task],
    batches_for: Callable[[str], Iterable[Mapping]],
    params: Mapping[str, Tensor] | ParamsFor | None = None,
    names: Iterable[str] | None = None,
) -> dict[str, dict]:
    """Evaluate every task (or ``names``) with the current merge, fixed ``params``, or ``params(task)``;
    a progress bar counts the tasks (on a terminal)."""
    from tqdm.auto import tqdm

    was_training = merged.training
    merged.eval()
    try:
        results = {}
        chosen = list(names if names is not None else tasks)
        for name in tqdm(chosen, desc="evaluating", unit="task", disable=None, leave=False):
            if params is None:
                task_params = merged.merged_parameters()
            elif callable(params):
                task_params = params(name)
            else:
                task_params = params
            results[name] = evaluate_task(merged, tasks[name], batches_for(name), task_params)
        return results
    finally:
        merged.train(was_training)


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
    checked before training: a bad one would otherwise fail inside torchmetrics at the end."""
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
