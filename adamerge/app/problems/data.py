"""A problem's data: each task's calibration, evaluation and validation rows, read from local
files or a ``datasets`` name with errors that name the task and file, and made into model inputs
by the kind's own preparation. Every kind loads its data through :func:`load_task_data`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from adamerge.app.config import DataSourceConfig, ProblemConfig, TaskConfig
from adamerge.io.checkpoints import UnreadableInput, reading

_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

# (table, task name, task config, labels needed) -> the rows a task's collate takes
Prepare = Callable[[object, str, TaskConfig, bool], Sequence]


def load_task_data(config: ProblemConfig, prepare: Prepare) -> tuple[dict[str, Sequence], ...]:
    """Each task's calibration rows (when it names data; labels not needed, a label-free objective
    learns from them), evaluation rows and validation rows (when it has an ``evaluation`` or a
    ``validation`` section; labels needed)."""
    calibration, evaluation, validation = {}, {}, {}
    for name, task in config.tasks.items():
        if has_data(task.calibration):
            calibration[name] = prepare(load_table(task.calibration, name, config.seed), name, task, False)
        for source, rows in ((task.evaluation, evaluation), (task.validation, validation)):
            if source is not None:
                rows[name] = prepare(load_table(source, name, config.seed), name, task, True)
    return calibration, evaluation, validation


def has_data(source: DataSourceConfig) -> bool:
    """Whether a task names calibration data (a data-free merge needs none; learning refuses a task without)."""
    return source.path is not None or source.dataset is not None


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
