"""A merge problem: the models, tasks and data a recipe describes, ready to merge; and reading a
task's data (local files or a ``datasets`` name) with errors that name the task and file.

Each problem kind (``adamerge.app.problems`` lists them) builds one of these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from adamerge.app.config import DataSourceConfig, ProblemConfig
from adamerge.io.checkpoints import UnreadableInput, WeightsSource, reading
from adamerge.learning.data import Collate, rows_to_batch
from adamerge.tasks.base import Task

Exporter = Callable[[nn.Module, Path, int], None]  # (merged module, folder, export.max_shard_size in bytes)


@dataclass
class MergeProblem:
    """Everything needed to merge, learn, evaluate and export, however it was described."""

    pretrained: nn.Module
    experts: dict[str, WeightsSource]
    tasks: dict[str, Task]
    calibration: dict[str, Sequence]
    evaluation: dict[str, Sequence] = field(default_factory=dict)
    collate: Collate | Mapping[str, Collate] = rows_to_batch
    include: list[str] | None = None
    exclude: list[str] | None = None
    save_model: Exporter | None = None  # writes the merged backbone into a folder
    save_extras: Callable[[Path], None] | None = None  # writes task heads etc. beside it
    description: dict[str, Any] = field(default_factory=dict)  # base/experts/kind for model cards
    # streamed problems (``build_problem(..., streamed=True)``): ``pretrained`` is a skeleton on ``meta``
    pretrained_weights: Mapping[str, Any] | None = None  # its checkpoint, read lazily
    save_config: Callable[[Path], None] | None = None  # writes what accompanies sharded weights (config, tokenizer)
    exported_key: Callable[[str], str | None] = lambda key: key  # a backbone tensor's name in that folder (None: left out)


# ---------------------------------------------------------------------- data loading

_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_table(source: DataSourceConfig, task: str, seed: int = 0):
    """Load one split as a ``datasets.Dataset``, with clear errors naming the task and file."""
    import datasets

    if (source.path is None) == (source.dataset is None):
        raise ValueError(f"task {task!r}: give exactly one of data 'path' or 'dataset'")
    if source.path is not None:
        file = _split_file(Path(source.path).expanduser(), source.split, task)
        where = str(file)
        with reading(f"task {task!r} data", file):
            if file.stat().st_size == 0:
                raise UnreadableInput(f"task {task!r} data {file}: the file is empty")
            try:
                table = datasets.load_dataset(_FORMATS[file.suffix], data_files=str(file), split="train")
            except ValueError as error:  # datasets' words for a header without rows
                if "corresponds to no data" not in str(error):
                    raise
                raise UnreadableInput(f"task {task!r}: no rows in {file}") from None
    else:
        where = f"{source.dataset}[{source.split}]"
        with reading(f"task {task!r} data", where):
            table = datasets.load_dataset(source.dataset, source.subset, split=source.split)
    if source.shuffle:
        table = table.shuffle(seed=seed)
    if source.skip:
        table = table.select(range(source.skip, len(table)) if source.skip < len(table) else [])
    if source.max_samples is not None:
        table = table.select(range(min(source.max_samples, len(table))))
    if len(table) == 0:
        raise ValueError(f"task {task!r}: no rows in {where}")
    return table


def _split_file(path: Path, split: str, task: str) -> Path:
    if path.is_dir():
        for suffix in _FORMATS:
            if (path / f"{split}{suffix}").exists():
                return path / f"{split}{suffix}"
        raise FileNotFoundError(f"task {task!r}: no {split}.{{jsonl,json,csv,parquet}} in {path}")
    if not path.exists():
        raise FileNotFoundError(f"task {task!r}: data file {path} not found")
    if path.suffix not in _FORMATS:
        raise ValueError(f"task {task!r}: {path} has an unsupported format; use one of {sorted(_FORMATS)}")
    return path


def has_data(source: DataSourceConfig) -> bool:
    """Whether a task names calibration data (a data-free merge needs none; learning refuses a task without)."""
    return source.path is not None or source.dataset is not None


def require(config: ProblemConfig, *what: str) -> None:
    if "pretrained" in what and not config.pretrained:
        raise ValueError(f"problem kind {config.kind!r} needs 'problem.pretrained'")
    if "tasks" in what and not config.tasks:
        raise ValueError(f"problem kind {config.kind!r} needs at least one entry in 'problem.tasks'")
    if "experts" in what:
        missing = [name for name, task in config.tasks.items() if not task.expert]
        if missing:
            raise ValueError(f"problem kind {config.kind!r}: task(s) {missing} need an 'expert'")


def experts_of(config: ProblemConfig) -> dict[str, str]:
    experts = {name: task.expert for name, task in config.tasks.items() if task.expert}
    for name, path in config.experts.items():
        if name in experts:
            raise ValueError(f"expert {name!r} is named both in problem.tasks and problem.experts")
        experts[name] = path
    return experts
