"""Label-free model selection: keep the coefficients with the best held-out criterion.

Entropy-style objectives keep falling while accuracy peaks and then decays (AdaMerging, Yang
et al. 2024, stop at a fixed step for this reason). Without labels, a criterion measured on
calibration rows the training never sees (``selection.holdout``), such as the KL to each task's
expert, tells the steps apart: this callback measures it every ``every_n_steps`` optimiser
steps (step 0 and the last step included), keeps the best coefficients, and puts them back
when training ends. Its state travels in Lightning checkpoints, so a resumed run selects
exactly as an uninterrupted one.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from adamerge.objectives import Objective


class LabelFreeSelection(Callback):
    """Measure ``objective`` on the held-out rows every ``every_n_steps`` steps; finish on the best.

    The criterion is the mean over tasks of each task's held-out loss, balanced as the training
    loss is (``task_balance``, against the first measurement), plus the objective's penalty.
    ``best`` is ``{"value", "step", "state"}`` (the coefficients' state dict), or None before
    the first measurement.
    """

    def __init__(self, objective: Objective, every_n_steps: int = 25):
        if every_n_steps < 1:
            raise ValueError(f"selection.every_n_steps must be >= 1, got {every_n_steps}")
        self.objective, self.every_n_steps = objective, every_n_steps
        self.best: dict | None = None
        self.reference: dict[str, float] | None = None  # each task's first held-out loss
        self.checked_step: int | None = None  # the last step measured (a resume does not measure it twice)
        self._ready = False

    @torch.no_grad()
    def criterion(self, learner: L.LightningModule) -> float:
        """The held-out criterion at the learner's current coefficients."""
        means = learner.mean_losses(self.objective, learner.trainer.datamodule.holdout_batches)
        if self.reference is None:
            self.reference = means
        per_task = [float(learner.loss.balanced(torch.tensor(v), name, self.reference)) for name, v in means.items()]
        penalty = self.objective.penalty(learner.merged)
        return sum(per_task) / len(per_task) + (float(penalty) if penalty is not None else 0.0)

    def _check(self, trainer: L.Trainer, learner: L.LightningModule) -> float | None:
        """Measure the current step unless it was measured already; keep it if it is the best."""
        step = trainer.global_step
        if step == self.checked_step:
            return None
        value = self.criterion(learner)
        if self.best is None or value < self.best["value"]:
            state = {k: v.detach().clone() for k, v in learner.merged.coefficients.state_dict().items()}
            self.best = {"value": value, "step": step, "state": state}
        self.checked_step = step
        return value

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: L.Trainer, learner: L.LightningModule) -> None:
        trained = [learner.objective, *getattr(learner.objective, "parts", ())]
        if not self._ready and not any(self.objective is o for o in trained):  # a shared one: the learner sets it up
            self.objective.setup(learner.objective_context())
        self._ready = True

    def on_train_start(self, trainer: L.Trainer, learner: L.LightningModule) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._check(trainer, learner)

    def on_train_batch_end(self, trainer: L.Trainer, learner: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            value = self._check(trainer, learner)
            if value is not None:
                learner.log("select/criterion", value)

    def on_train_end(self, trainer: L.Trainer, learner: L.LightningModule) -> None:
        self._check(trainer, learner)
        learner.merged.coefficients.load_state_dict(self.best["state"])

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"best": self.best, "reference": self.reference, "checked_step": self.checked_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best, self.reference = state_dict["best"], state_dict["reference"]
        self.checked_step = state_dict["checked_step"]
