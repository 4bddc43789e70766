"""Evaluation as a Lightning test run: one dataloader per task, every process on its own share.

Each process takes a contiguous share of every task's evaluation rows (no row twice, none left
out: Lightning's distributed sampler would pad the shares with repeated rows). Every diagnostic
is built from sums kept as torchmetrics states, so ``compute()`` adds them up across processes
and each process ends with the numbers one process would have found. The results are logged as
``eval/<task>/<metric>`` to the Trainer's loggers, and put whole in ``trainer.callback_metrics``
under ``results/``: the one channel Lightning carries back from ``ddp_spawn`` workers.

Besides accuracy and the mean cross-entropy (when labels exist; and perplexity, its exponential,
for language models' tokens) every task reports its prediction histogram, the mean per-sample
entropy and the entropy of the mean prediction: a merge that collapses onto one class shows a
histogram with one spike and a near-zero mean-prediction entropy.

:func:`evaluate` runs it on the Trainer that learned the coefficients (its loggers and processes:
DDP, ``ddp_spawn``) or on a one-device Trainer where the weights already are (data-free merges,
progressive and FW-Merging runs, re-evaluation). :func:`check_labels` runs before training: a label
outside its head's classes would otherwise fail the evaluation at the very end.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from adamerge.core.merged import FunctionalModel
from adamerge.learning.data import ordered_batches
from adamerge.learning.progress import TaskProgressBar
from adamerge.objectives.entropy import prediction_entropy
from adamerge.tasks.base import Task, TaskOutput

RESULTS = "results"
_HISTOGRAM_MAX_CLASSES = 100
ParamsFor = Callable[[str], Mapping[str, Tensor]]


class TaskDiagnostics(Metric):
    """The sums behind one task's diagnostics, added across processes by torchmetrics."""

    full_state_update = False

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes
        self.add_state("counts", torch.zeros(classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("probability_sum", torch.zeros(classes), dist_reduce_fx="sum")
        for name in ("entropy_sum", "nll_sum"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("rows", "token_rows", "labelled", "correct"):
            self.add_state(name, torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, output: TaskOutput) -> None:
        logits = output.logits.float()
        predictions = logits.argmax(dim=-1)
        self.counts += torch.bincount(predictions, minlength=self.classes)
        self.probability_sum += logits.softmax(dim=-1).sum(dim=0)
        self.entropy_sum += prediction_entropy(logits).sum().double()
        self.rows += logits.shape[0]
        if output.sample_rows is not None:  # a language model's rows are tokens
            self.token_rows += logits.shape[0]
        if output.labels is not None:
            self.nll_sum += torch.nn.functional.cross_entropy(logits, output.labels, reduction="sum").double()
            self.labelled += output.labels.numel()
            self.correct += (predictions == output.labels).sum()

    def compute(self) -> dict[str, float | int | list[int]]:
        rows = int(self.rows)  # at least one: every task's evaluation set has rows
        mean_prediction = self.probability_sum / rows
        result: dict[str, float | int | list[int]] = {
            "samples": rows,
            "entropy": float(self.entropy_sum) / rows,
            "mean_prediction_entropy": float(prediction_entropy(mean_prediction.log().unsqueeze(0))[0]),
            "max_entropy": math.log(self.classes),
        }
        if int(self.labelled):
            result["accuracy"] = int(self.correct) / int(self.labelled)  # micro accuracy over the labelled rows
            result["loss"] = float(self.nll_sum) / rows  # mean cross-entropy (of tokens, for a language model)
            if int(self.token_rows):
                result["perplexity"] = math.exp(result["loss"])
        if self.classes <= _HISTOGRAM_MAX_CLASSES:
            result["histogram"] = self.counts.tolist()
        return result


class _Share:
    """This process's contiguous share of a task's evaluation rows, in batches; an ``uncounted``
    share is one row that is read but not evaluated (see ``test_dataloader``)."""

    def __init__(self, name: str, dataset: Sequence, rows: list[int], batch_size: int, collate, counted: bool = True):
        self.name, self.dataset, self.rows, self.batch_size, self.collate = name, dataset, rows, batch_size, collate
        self.counted = counted

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def __iter__(self):
        return ordered_batches(self.name, self.dataset, self.batch_size, self.collate, self.rows) if self.rows else iter(())


class TaskEvaluation(L.LightningModule):
    """Evaluates ``names`` of ``tasks`` on ``data``'s evaluation rows (a :class:`CalibrationData`)
    with the current merge (``params=None``), fixed ``params``, or ``params(task)``."""

    def __init__(self, model: FunctionalModel, tasks: Mapping[str, Task], data, names: Sequence[str],
                 params: Mapping[str, Tensor] | ParamsFor | None = None):
        super().__init__()
        if any(p.is_meta for p in model.parameters()):
            self.__dict__["model"] = model  # a streamed skeleton: params bring the tensors; Lightning must not move it
        else:
            self.model = model
        self.tasks = nn.ModuleDict({name: tasks[name] for name in names})
        self.names, self.data, self.params = list(names), data, params
        self.allow_zero_length_dataloader_with_multiple_devices = True  # a process may have none of a task's rows
        self.diagnostics: dict[str, TaskDiagnostics] = {}
        self._shares: list[_Share] = []
        self._current: tuple[str | None, Mapping[str, Tensor]] | None = None

    def test_dataloader(self) -> list[_Share]:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        shares = []
        for name in self.names:
            dataset = self.data.evaluation[name]
            if len(dataset) == 0:
                raise ValueError(f"task {name!r}: no evaluation rows")
            rows = torch.arange(len(dataset)).tensor_split(world)[rank].tolist()
            shares.append(_Share(name, dataset, rows, self.data.eval_batch_size, self.data.collate_for(name)))
        if not any(share.rows for share in shares):
            # Lightning skips a process without batches, and the others would wait for it at the sums
            first = shares[0]
            shares[0] = _Share(first.name, first.dataset, [0], 1, first.collate, counted=False)
        self._shares = shares
        return shares

    def _task_params(self, name: str) -> Mapping[str, Tensor]:
        """The tensors to run ``name`` with: built once per task (once in all, unless per task)."""
        key = name if callable(self.params) else None
        if self._current is None or self._current[0] != key:
            self._current = None  # the previous task's go before the next task's are built
            if self.params is None:
                params = self.model.merged_parameters()
            elif callable(self.params):
                params = self.params(name)
            else:
                params = {k: v.to(self.device) for k, v in self.params.items()}
            self._current = (key, params)
        return self._current[1]

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._shares[dataloader_idx].counted:
            return
        name = self.names[dataloader_idx]
        output = self.tasks[name](self.model, self._task_params(name), batch)
        if name not in self.diagnostics:
            self.diagnostics[name] = TaskDiagnostics(output.logits.shape[-1]).to(self.device)
        self.diagnostics[name].update(output)

    def on_test_epoch_end(self) -> None:
        self._current = None
        results = {name: self._task_result(name) for name in self.names}
        scalars = {f"eval/{name}/{key}": float(value) for name, result in results.items()
                   for key, value in result.items() if key != "histogram"}
        # the values are already summed over processes; sync_dist only tells Lightning so
        self.log_dict(scalars, sync_dist=True, add_dataloader_idx=False)
        for name, result in results.items():
            for key, value in result.items():
                dtype = torch.float64 if isinstance(value, float) else None
                self.trainer.callback_metrics[f"{RESULTS}/{name}/{key}"] = torch.tensor(value, dtype=dtype)
        self.diagnostics.clear()

    def _task_result(self, name: str) -> dict:
        """One task's results over every process (a process that had none of its rows joins in with zeros)."""
        local = self.diagnostics[name].classes if name in self.diagnostics else 0
        classes = int(self.trainer.strategy.reduce(torch.tensor(local, device=self.device), reduce_op="max"))
        if name not in self.diagnostics:
            self.diagnostics[name] = TaskDiagnostics(classes).to(self.device)
        with warnings.catch_warnings():  # zeros are this process's right sums: torchmetrics need not warn
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            return self.diagnostics[name].compute()


def take_results(callback_metrics: dict[str, Tensor], names: Sequence[str]) -> dict[str, dict]:
    """The ``{task: {metric: value}}`` a :class:`TaskEvaluation` run left in ``callback_metrics``,
    taken out (a later run on the same Trainer starts without them)."""
    results: dict[str, dict] = {name: {} for name in names}
    for key in [k for k in callback_metrics if k.startswith(RESULTS + "/")]:
        name, metric = key[len(RESULTS) + 1 :].rsplit("/", 1)
        value = callback_metrics.pop(key)
        if name in results:
            results[name][metric] = value.tolist()
    return results


# ---------------------------------------------------------------------- running it, and the label check


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
    of its own; a progress bar naming the task it evaluates (``io.terminal``'s policy)."""
    tensors = list(params.values()) if isinstance(params, Mapping) else []
    tensors += [p for p in model.parameters() if not p.is_meta]
    device = tensors[0].device if tensors else torch.device("cpu")
    accelerator = {"cuda": "gpu"}.get(device.type, device.type)
    return L.Trainer(
        accelerator=accelerator,
        devices=[device.index or 0] if device.type == "cuda" else 1,
        logger=False,
        callbacks=[TaskProgressBar()],
        enable_checkpointing=False,
        enable_model_summary=False,
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
