"""Calibration data: one balanced batch per task per step, reproducible and resumable.

Each task's unlabelled calibration rows are visited in seeded random order, epoch after
epoch, as one endless stream; step ``s`` reads rows ``s·G … (s+1)·G`` of that stream
(``G`` = batch size × number of processes, each process taking its slice). The only state is
the step counter, so a run resumed from a checkpoint sees exactly the batches it would
have seen without the interruption.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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
        rows: Sequence[int] | None = None,
    ):
        self.rows = list(range(len(dataset))) if rows is None else list(rows)
        if not self.rows:
            raise ValueError(f"task {name!r} has no calibration data")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.name, self.dataset, self.batch_size, self.collate = name, dataset, batch_size, collate
        self.seed, self.rank, self.world_size = seed, rank, world_size

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, step: int) -> dict[str, Any]:
        G = self.global_batch_size
        positions = stream_indices(len(self.rows), self.seed, step * G, G)
        mine = [self.rows[p] for p in positions[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]]
        return collate_rows(self.dataset, mine, self.collate)


class MultiTaskStream:
    """Endless ``{task: batch}`` stream with one counter as its whole state (Lightning-resumable).

    Batch ``s`` is a pure function of ``s``, so ``workers`` threads can build the next batches
    (read rows, tokenise, run an image processor, collate) while the device trains on this one,
    and the state is still only the count of batches handed out. ``pin_memory``: batches are
    returned in page-locked memory, so their copy to a GPU is asynchronous.
    """

    def __init__(self, tasks: Mapping[str, TaskBatches], length: int | None = None, workers: int = 0,
                 pin_memory: bool = False):
        self.tasks = dict(tasks)
        self.step = 0
        self.length = length
        self.workers, self.pin_memory = workers, pin_memory

    def __len__(self) -> int:
        """Steps per Lightning epoch: the whole run when given (one progress bar over all steps),
        else enough for the largest task to be seen once."""
        if self.length:
            return self.length
        return max(math.ceil(len(t) / t.global_batch_size) for t in self.tasks.values())

    def build(self, step: int) -> dict[str, dict]:
        """Batch ``step`` of every task (pinned when asked)."""
        batch = {name: task.batch(step) for name, task in self.tasks.items()}
        if self.pin_memory:
            batch = {name: {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                     for name, b in batch.items()}
        return batch

    def __iter__(self) -> Iterator[dict[str, dict]]:
        if not self.workers:
            while True:
                batch = self.build(self.step)
                self.step += 1
                yield batch
        with ThreadPoolExecutor(self.workers, thread_name_prefix="adamerge-batches") as pool:
            ahead = deque(pool.submit(self.build, s) for s in range(self.step, self.step + 2 * self.workers))
            upcoming = self.step + len(ahead)
            while True:
                batch = ahead.popleft().result()
                ahead.append(pool.submit(self.build, upcoming))
                upcoming += 1
                self.step += 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.step = int(state["step"])


def collate_rows(dataset: Sequence, rows: Sequence[int], collate: Collate) -> dict[str, Any]:
    """Collate the given rows, recording their positions in the dataset as ``index``."""
    batch = collate([dataset[i] for i in rows])
    batch["index"] = torch.tensor(list(rows), dtype=torch.long)
    return batch


def ordered_batches(name: str, dataset: Sequence, batch_size: int, collate: Collate = rows_to_batch, rows=None):
    """The given rows (default: all) in order, in batches, each with its rows' ``index``."""
    rows = list(range(len(dataset))) if rows is None else list(rows)
    if not rows:
        raise ValueError(f"task {name!r} has no data")
    for start in range(0, len(rows), batch_size):
        yield collate_rows(dataset, rows[start : start + batch_size], collate)


def by_length(dataset: Sequence, rows: Sequence[int], field: str = "input_ids") -> list[int]:
    """``rows`` ordered by the length of their ``field`` (stable), so batches of neighbours pad
    little; rows without the field keep their order."""
    rows = list(rows)
    if not rows or not isinstance(dataset[rows[0]], Mapping) or field not in dataset[rows[0]]:
        return rows
    return sorted(rows, key=lambda i: len(dataset[i][field]))


def split_holdout(size: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """(training rows, held-out rows): a seeded random ``holdout`` fraction (or count, if >= 1) held out."""
    count = int(holdout) if holdout >= 1 else int(round(holdout * size))
    if count and count >= size:
        raise ValueError(f"holdout of {count} rows leaves no calibration rows out of {size}")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed + 7_777_777)).tolist()
    return sorted(order[count:]), sorted(order[:count])


class CalibrationData(L.LightningDataModule):
    """Per-task calibration sets (labels unused for learning), optional held-out rows for
    label-free model selection, and optional labelled evaluation sets.

    Row ``index`` values always refer to positions in the full calibration set, so targets
    precomputed over it (e.g. expert outputs) serve both the training and held-out rows.
    """

    def __init__(
        self,
        calibration: Mapping[str, Sequence],
        collate: Collate | Mapping[str, Collate] = rows_to_batch,
        batch_size: int = 16,
        seed: int = 0,
        evaluation: Mapping[str, Sequence] | None = None,
        eval_batch_size: int = 64,
        holdout: float = 0.0,
        workers: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__()
        self.workers, self.pin_memory = workers, pin_memory
        if not calibration and not evaluation:
            raise ValueError("no calibration data (and no evaluation data): give at least one task some")
        for name, dataset in calibration.items():
            if len(dataset) == 0:
                raise ValueError(f"task {name!r} has no calibration data")
        self.calibration = dict(calibration)
        self.evaluation = dict(evaluation or {})
        self._collate = collate
        self.batch_size, self.seed, self.eval_batch_size = batch_size, seed, eval_batch_size
        self.splits = {name: split_holdout(len(d), holdout, seed) for name, d in self.calibration.items()}

    def collate_for(self, task: str) -> Collate:
        return self._collate[task] if isinstance(self._collate, Mapping) else self._collate

    def train_dataloader(self) -> MultiTaskStream:
        """The stream of ``{task: batch}``: ``workers`` threads build upcoming batches; pinned for a GPU."""
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        steps = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else None
        return MultiTaskStream(
            {
                name: TaskBatches(
                    name, dataset, self.batch_size, self.collate_for(name), self.seed, rank, world, self.splits[name][0]
                )
                for name, dataset in self.calibration.items()
            },
            length=steps,
            workers=self.workers,
            pin_memory=self.pin_memory,
        )

    def calibration_batches(self, task: str, batch_size: int | None = None):
        """Every calibration row of a task (training and held-out), in order."""
        return ordered_batches(task, self.calibration[task], batch_size or self.eval_batch_size, self.collate_for(task))

    def holdout_batches(self, task: str, batch_size: int | None = None):
        """The held-out calibration rows of a task, in order (none without ``holdout``)."""
        rows = self.splits[task][1]
        if not rows:
            return iter(())
        return ordered_batches(task, self.calibration[task], batch_size or self.eval_batch_size, self.collate_for(task), rows)

    def evaluation_batches(self, task: str, batch_size: int | None = None):
        return ordered_batches(task, self.evaluation[task], batch_size or self.eval_batch_size, self.collate_for(task))
