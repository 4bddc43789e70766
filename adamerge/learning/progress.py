"""Lightning's progress bars, saying what runs and following ``io.terminal``'s policy (a live bar
on a terminal, a line every 5% in a log).

Lightning's default bar names an evaluation's dataloaders by index (``Testing DataLoader 1``)
where each is one task's rows, so :class:`TaskProgressBar` names the task instead. It also counts
batches within epochs, which for a run bounded by ``max_steps`` over a calibration stream reads
``Epoch 0/-2``; coefficient learning has steps, not epochs, so :class:`StepProgressBar` shows
``learning coefficients: step / max_steps`` (continuing from the resumed step) with the logged losses.
Lightning's bars write to stdout, so stdout decides between a live bar and lines.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from adamerge.io.terminal import bar_stream, due


class TaskProgressBar(TQDMProgressBar):
    """The evaluation bar reads ``evaluating <task> (i/K)``: the module's ``names`` are its dataloaders' tasks."""

    @staticmethod
    def task_description(names: Sequence[str], dataloader_idx: int) -> str:
        return f"evaluating {names[dataloader_idx]} ({dataloader_idx + 1}/{len(names)})"

    def init_test_tqdm(self) -> Tqdm:
        return self._tqdm("evaluating")

    def _tqdm(self, desc: str, **kwargs: Any) -> Tqdm:
        return Tqdm(desc=desc, position=2 * self.process_position, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=bar_stream(sys.stdout), bar_format=self.BAR_FORMAT, **kwargs)

    def on_test_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.has_dataloader_changed(dataloader_idx):
            return
        total = self.total_test_batches_current_dataloader
        self.test_progress_bar.set_description(self.task_description(pl_module.names, dataloader_idx), refresh=False)
        self.test_progress_bar.reset(total=None if math.isinf(total) else total)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        shown = self.test_progress_bar
        if self.is_enabled and due(batch_idx + 1, shown.total, sys.stdout):
            shown.n = batch_idx + 1
            shown.refresh()


class StepProgressBar(TaskProgressBar):
    """One bar over the whole run, opened at the start of training (Lightning's ``on_train_start``)."""

    def init_train_tqdm(self) -> Tqdm:
        steps = self.trainer.max_steps
        return self._tqdm("learning coefficients", total=steps if steps and steps > 0 else None,
                          initial=self.trainer.global_step, smoothing=0)

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        """Steps, not epochs: an epoch's start changes nothing on the bar."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        shown, step = self.train_progress_bar, trainer.global_step
        if self.is_enabled and due(step, shown.total, sys.stdout):
            shown.n = step
            shown.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            shown.refresh()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """Steps, not epochs: the losses show with the next step."""
