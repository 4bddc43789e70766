"""Progress bars that say what runs: the evaluated task, and a learning run's steps.

Lightning's default bar names an evaluation's dataloaders by index (``Testing DataLoader 1``)
where each is one task's rows, so :class:`TaskProgressBar` names the task instead. It also counts
batches within epochs, which for a run bounded by ``max_steps`` over a calibration stream reads
``Epoch 0/-2``; coefficient learning has steps, not epochs, so :class:`StepProgressBar` shows
``learning coefficients: step / max_steps`` (continuing from the resumed step) with the logged losses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar


class TaskProgressBar(TQDMProgressBar):
    """The evaluation bar reads ``evaluating <task> (i/K)``: the module's ``names`` are its dataloaders' tasks."""

    @staticmethod
    def task_description(names: Sequence[str], dataloader_idx: int) -> str:
        return f"evaluating {names[dataloader_idx]} ({dataloader_idx + 1}/{len(names)})"

    def on_test_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.has_dataloader_changed(dataloader_idx):
            return
        total = self.total_test_batches_current_dataloader
        self.test_progress_bar.reset(total=None if math.isinf(total) else total)
        self.test_progress_bar.set_description(self.task_description(pl_module.names, dataloader_idx))


class StepProgressBar(TaskProgressBar):
    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        if self.train_progress_bar is None or trainer.current_epoch == 0 or self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self.train_progress_bar.reset(total=total)
        self.train_progress_bar.initial = 0
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description("learning coefficients")
        self.train_progress_bar.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self._should_update(step, self.train_progress_bar.total):
            self.train_progress_bar.n = step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
            self.train_progress_bar.refresh()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
