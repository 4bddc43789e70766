"""The text tasks the MiniLM and SmolLM2 zoos learn, read where they lie (never copied).

Layout: ``<data_root>/<task>/{train,test}.jsonl`` with one ``{"text", "label"[, "text_pair"]}``
object per line, and ``<data_root>/<task>/meta.json`` with at least ``num_labels`` (plus
``label_names`` and ``pair``). Every error names the file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch


def read_task_meta(task_dir: str | os.PathLike) -> dict:
    """``<task_dir>/meta.json`` as a dict (must hold ``num_labels``; ``label_names`` and ``pair``
    are filled in when absent)."""
    file = Path(task_dir).expanduser() / "meta.json"
    if not file.is_file():
        raise FileNotFoundError(f"task metadata {file} does not exist")
    text = file.read_text()
    if not text.strip():
        raise ValueError(f"task metadata {file} is empty")
    try:
        meta = json.loads(text)
    except ValueError as error:
        raise ValueError(f"task metadata {file} is not valid JSON: {error}") from error
    if not isinstance(meta, dict) or "num_labels" not in meta:
        raise ValueError(f"task metadata {file} has no 'num_labels'")
    meta["num_labels"] = int(meta["num_labels"])
    if meta["num_labels"] < 2:
        raise ValueError(f"task metadata {file}: num_labels must be at least 2, got {meta['num_labels']}")
    meta.setdefault("task", Path(task_dir).name)
    names = meta.get("label_names") or [str(i) for i in range(meta["num_labels"])]
    if len(names) != meta["num_labels"]:
        raise ValueError(f"task metadata {file}: {len(names)} label_names for num_labels={meta['num_labels']}")
    meta["label_names"] = [str(n) for n in names]
    meta["pair"] = bool(meta.get("pair", False))
    return meta


def load_text_task(task_dir: str | os.PathLike, split: str):
    """``<task_dir>/<split>.jsonl`` as a ``datasets.Dataset`` (columns ``text``, ``label`` and,
    for sentence pairs, ``text_pair``)."""
    import datasets

    file = Path(task_dir).expanduser() / f"{split}.jsonl"
    if not file.is_file():
        raise FileNotFoundError(f"text data file {file} does not exist")
    with open(file, encoding="utf-8") as handle:
        if not any(line.strip() for line in handle):
            raise ValueError(f"text data file {file} is empty")
    with _quiet_datasets():
        table = datasets.load_dataset("json", data_files={split: str(file)}, split=split)
    if len(table) == 0:
        raise ValueError(f"text data file {file} is empty")
    missing = [c for c in ("text", "label") if c not in table.column_names]
    if missing:
        raise KeyError(f"text data file {file} has no column(s) {missing} (columns: {table.column_names})")
    return table


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    import datasets

    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            datasets.utils.logging.enable_progress_bar()


def _columns(table, meta: dict, file_hint: str) -> tuple[list[str], list[str] | None, list[int]]:
    texts = [str(t) for t in table["text"]]
    pairs = None
    if meta["pair"]:
        if "text_pair" not in table.column_names:
            raise KeyError(f"{file_hint}: meta.json says 'pair' but the data has no 'text_pair' column")
        pairs = [str(t) for t in table["text_pair"]]
    labels = [int(y) for y in table["label"]]
    bad = sorted({y for y in labels if not 0 <= y < meta["num_labels"]})
    if bad:
        raise ValueError(f"{file_hint}: labels {bad[:10]} outside [0, {meta['num_labels']})")
    return texts, pairs, labels


def list_text_tasks(data_root: str | os.PathLike) -> list[str]:
    """The tasks under ``data_root`` (folders holding a ``meta.json``), sorted."""
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"text data root {root} does not exist")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "meta.json").is_file())


def task_rows(task_dir: Path, meta: dict, seed: int, max_train: int | None, max_test: int | None):
    """``(texts, pairs, labels)`` of the training rows (a seeded sample of ``max_train``) and of
    the first ``max_test`` test rows, and how many training rows there were."""
    train_table = load_text_task(task_dir, "train")
    test_table = load_text_task(task_dir, "test")
    n_available = len(train_table)
    if max_train is not None and max_train < n_available:
        keep = torch.randperm(n_available, generator=torch.Generator().manual_seed(int(seed))).tolist()[: int(max_train)]
        train_table = train_table.select(sorted(keep))
    if max_test is not None and max_test < len(test_table):
        test_table = test_table.select(range(int(max_test)))
    train = _columns(train_table, meta, str(task_dir / "train.jsonl"))
    test = _columns(test_table, meta, str(task_dir / "test.jsonl"))
    return train, test, n_available
