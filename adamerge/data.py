"""Calibration data: one balanced batch per task per step, reproducible and resumable.

Each task's unlabelled calibration rows are visited in seeded random order, epoch after
epoch, as one endless stream; step ``s`` reads rows ``s·G … (s+1)·G`` of that stream
(``G`` = batch size × number of processes, each process taking its slice). The only state is
the step counter, so a run resumed from a checkpoint sees exactly the batches it would
have seen without the interruption.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import default_collate

Collate = Callable[[list[dict]], dict]


def rows_to_batch(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Default collate: stack equal-shaped fields; a ``label`` field becomes ``labels``."""
    batch = default_collate([dict(row) for row in rows])
    if "label" in batch:
        batch["labels"] = batch.pop("label")
    return batch


def epoch_permutation(size: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=generator)


def stream_indices(size: int, seed: int, start: int, count: int, shuffle: bool = True) -> list[int]:
    """Rows ``start … start+count`` of the endless stream of seeded epoch permutations of ``size`` rows."""
    indices: list[int] = []
    position = start
    while len(indices) < count:
        epoch, offset = divmod(position, size)
        order = epoch_permutation(size, seed, epoch) if shuffle else torch.arange(size)
        take = min(size - offset, count - len(indices))
        indices.extend(order[offset : offset + take].tolist())
        position += take
    return indices


class TaskBatches:
    """Builds batch ``s`` of one task (this process's slice of the global batch)."""

    def __init__(
        self,
        name: str,
        dataset: Sequence,
        batch_size: int,
        collate: Collate = rows_to_batch,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if len(dataset) == 0:
            raise ValueError(f"task {name!r} has no calibration data")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.name, self.dataset, self.batch_size, self.collate = name, dataset, batch_size, collate
        self.seed, self.rank, self.world_size = seed, rank, world_size

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def batch(self, step: int) -> dict[str, Any]:
        G = self.global_batch_size
        indices = stream_indices(len(self.dataset), self.seed, step * G, G)
        mine = indices[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        batch = self.collate([self.dataset[i] for i in mine])
        batch["index"] = torch.tensor(mine, dtype=torch.long)
        return batch


class MultiTaskStream:
    """Endless ``{task: batch}`` stream with one counter as its whole state (Lightning-resumable)."""

    def __init__(self, tasks: Mapping[str, TaskBatches]):
        self.tasks = dict(tasks)
        self.step = 0

    def __len__(self) -> int:
        """Steps per epoch: enough for the largest task to be seen once."""
        return max(math.ceil(len(t.dataset) / t.global_batch_size) for t in self.tasks.values())

    def __iter__(self) -> Iterator[dict[str, dict]]:
        while True:
            batch = {name: task.batch(self.step) for name, task in self.tasks.items()}
            self.step += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.step = int(state["step"])


def ordered_batches(name: str, dataset: Sequence, batch_size: int, collate: Collate = rows_to_batch):
    """All rows of a dataset in order, in batches, each with its rows' ``index`` (for precomputing)."""
    if len(dataset) == 0:
        raise ValueError(f"task {name!r} has no data")
    for start in range(0, len(dataset), batch_size):
        indices = list(range(start, min(start + batch_size, len(dataset))))
        batch = collate([dataset[i] for i in indices])
        batch["index"] = torch.tensor(indices, dtype=torch.long)
        yield batch


class CalibrationData(L.LightningDataModule):
    """Per-task calibration sets (labels unused for learning) and optional labelled evaluation sets."""

    def __init__(
        self,
        calibration: Mapping[str, Sequence],
        collate: Collate | Mapping[str, Collate] = rows_to_batch,
        batch_size: int = 16,
        seed: int = 0,
        evaluation: Mapping[str, Sequence] | None = None,
        eval_batch_size: int = 64,
    ):
        super().__init__()
        if not calibration:
            raise ValueError("no calibration data: give at least one task")
        for name, dataset in calibration.items():
            if len(dataset) == 0:
                raise ValueError(f"task {name!r} has no calibration data")
        self.calibration = dict(calibration)
        self.evaluation = dict(evaluation or {})
        self._collate = collate
        self.batch_size, self.seed, self.eval_batch_size = batch_size, seed, eval_batch_size

    def collate_for(self, task: str) -> Collate:
        return self._collate[task] if isinstance(self._collate, Mapping) else self._collate

    def train_dataloader(self) -> MultiTaskStream:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return MultiTaskStream(
            {
                name: TaskBatches(name, dataset, self.batch_size, self.collate_for(name), self.seed, rank, world)
                for name, dataset in self.calibration.items()
            }
        )

    def calibration_batches(self, task: str, batch_size: int | None = None):
        return ordered_batches(task, self.calibration[task], batch_size or self.eval_batch_size, self.collate_for(task))

    def evaluation_batches(self, task: str, batch_size: int | None = None):
        return ordered_batches(task, self.evaluation[task], batch_size or self.eval_batch_size, self.collate_for(task))
