"""The one learning contract: every way of learning a merge is called and saved the same way.

A learner (the Lightning coefficient learner, progressive / streamed distillation, FW-Merging,
and any added later) declares which ``trainer`` fields it honours — a recipe that sets another
one is refused before any model loads, naming the field and the learner — and returns a
:class:`LearnedMerge`: what to evaluate, what to export, its coefficients, its extra files and
its training log. The runner evaluates, writes and cleans up every result in one place.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol

from omegaconf import OmegaConf
from torch import Tensor, nn

from adamerge.core.merged import FunctionalModel
from adamerge.learning.placement import Placement

# every learner runs on the resolved device, with this batch size, bar and thread count
COMMON_TRAINER_FIELDS = frozenset({"accelerator", "batch_size", "progress_bar", "threads", "tf32"})


@dataclass
class LearnedMerge:
    """What a learner returns.

    ``model`` evaluates the merge: with ``params`` (the merged tensors by name) or, when ``params``
    is None, with its own current merge (a :class:`~adamerge.core.merged.MergedModel`).
    ``export``: the merged model to write (a module, or the folder of a streamed run's shards).
    ``coefficients``: the learned coefficients (None for FW-Merging, which keeps a history).
    ``files``: more files for the run directory (name → text). ``log``: the training log's rows
    (each with a ``step`` and ``train/loss``), written as ``metrics.csv`` unless the learner's
    Lightning logger already wrote one in ``log_dir``. ``trainer``: the Lightning Trainer that
    learned, so evaluation runs on its processes and loggers.
    """

    model: FunctionalModel
    export: nn.Module | Path
    how: str
    params: Mapping[str, Tensor] | None = None
    coefficients: Any = None
    files: dict[str, str] = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)
    log_dir: Path | None = None
    trainer: Any = None


class Learner(Protocol):
    """A way of learning a merge. ``trainer_fields``: the ``trainer`` fields it honours beyond
    :data:`COMMON_TRAINER_FIELDS`; ``streamed(recipe)``: whether the problem is built as a skeleton."""

    name: ClassVar[str]
    trainer_fields: ClassVar[frozenset[str]]

    def streamed(self, recipe) -> bool: ...

    def learn(self, recipe, problem, data, placement: Placement, work_dir: Path, resume: Path | None) -> LearnedMerge:
        """Learn on ``problem``; ``resume``: the checkpoint of an interrupted attempt, if any."""


def unhonoured_trainer_fields(honoured: frozenset[str], trainer, defaults) -> list[str]:
    """The ``trainer`` fields set away from their ``defaults`` (a dataclass) that a learner honouring
    ``honoured`` (beyond :data:`COMMON_TRAINER_FIELDS`) would ignore."""
    return [
        f.name for f in fields(defaults)
        if f.name not in COMMON_TRAINER_FIELDS | honoured and _plain(getattr(trainer, f.name)) != _plain(getattr(defaults, f.name))
    ]


def log_csv(rows: list[dict]) -> str:
    """A training log as CSV text, every row's keys as columns (in first-seen order)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
