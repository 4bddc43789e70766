"""The Lightning system that trains merge coefficients.

A thin shell around an exportable :class:`~adamerge.core.merged.MergedModel`: one merge per
step shared by all tasks, ``loss = Σ_task w_task · balance(objective(task batch)) + penalty``
(:class:`~adamerge.learning.loss.TaskLoss`), the constraint re-imposed after each optimiser
step, and checkpoints that hold only the coefficients and the optimiser state. Label-free
model selection is a separate callback (:mod:`adamerge.learning.selection`).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from torch import Tensor, nn

from adamerge.core.merged import MergedModel
from adamerge.io.checkpoints import load_checkpoint, write_bytes
from adamerge.learning.loss import TaskLoss
from adamerge.learning.optimizers import build_optimizer
from adamerge.objectives import Objective, ObjectiveContext
from adamerge.tasks.base import Task

COEFFICIENT_PREFIX = "merged.coefficients."


@contextmanager
def frozen_modules_expected() -> Iterator[None]:
    """Around ``Trainer.fit``: the backbone, the task heads and the objectives stay in eval mode on
    purpose (frozen; no dropout), so Lightning's warning about modules in eval mode is expected."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
        yield


class _InjectGradients(torch.autograd.Function):
    """A zero whose gradient with respect to ``tensors`` is ``grads`` (times the incoming gradient):
    sends gradients gathered on detached copies of the merged weights back through the merge."""

    @staticmethod
    def forward(ctx, grads: list[Tensor | None], *tensors: Tensor) -> Tensor:
        ctx.grads = grads
        return torch.zeros((), dtype=torch.float32, device=tensors[0].device)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if bool(grad_output == 1):  # the usual case (no loss scaling): no pass over every gradient
            return (None, *ctx.grads)
        return (None, *[None if g is None else g * grad_output.to(g.dtype) for g in ctx.grads])


class CoefficientLearner(L.LightningModule):
    """Learns ``merged.coefficients`` by minimising ``objective`` over every task's batches.

    ``per_task_backward``: run each task's forward and backward in turn against detached merged
    weights, so only one task's activations are alive at a time; the gathered weight gradients
    then go through the merge in one backward. Same gradients, less peak memory with many tasks.
    Those backwards run outside Lightning's precision plugin, so they apply its loss scaler
    (``16-mixed``) themselves.
    """

    def __init__(
        self,
        merged: MergedModel,
        tasks: Mapping[str, Task],
        objective: Objective,
        lr: float = 1e-3,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        task_weights: Mapping[str, float] | None = None,
        task_balance: str = "sum",
        guard_weight: float = 4.0,
        per_task_backward: bool = False,
    ):
        super().__init__()
        self.merged = merged
        # every process builds the same task vectors from the same checkpoints: DDP need not
        # broadcast them at start-up (K·|τ| bytes; CPU-offloaded ones could not go over NCCL)
        self._ddp_params_and_buffers_to_ignore = [f"merged.vectors.{name}" for name, _ in merged.vectors.named_buffers()]
        self.tasks = nn.ModuleDict(dict(tasks))
        self.objective = objective
        self.loss = TaskLoss(self.tasks, objective, task_weights, task_balance, guard_weight)
        self.lr, self.optimizer_name, self.weight_decay = lr, optimizer, weight_decay
        self.per_task_backward = per_task_backward
        self.strict_loading = False
        self._objective_ready = False

    # ------------------------------------------------------------------ set-up
    def objective_context(self) -> ObjectiveContext:
        """What an objective's ``setup`` may read: the merged model, the tasks, calibration batches on this device."""
        datamodule = self.trainer.datamodule
        return ObjectiveContext(
            merged=self.merged,
            tasks=self.tasks,
            calibration_batches=lambda task: (self.to_device(b) for b in datamodule.calibration_batches(task)),
            device=self.device,
        )

    def on_fit_start(self) -> None:
        if self._objective_ready:
            return
        self.objective.setup(self.objective_context())
        if self.loss.balance.needs_start and self.loss.initial is None:
            self.loss.initial = self.mean_losses(self.objective, self.trainer.datamodule.calibration_batches)
        self._objective_ready = True

    @torch.no_grad()
    def mean_losses(self, objective: Objective, batches_for) -> dict[str, float]:
        """Each task's mean loss under ``objective`` at the current coefficients over ``batches_for(task)``."""
        params = self.merged.merged_parameters()
        return self.loss.mean_losses(self.merged, params, objective, lambda task: map(self.to_device, batches_for(task)))

    def to_device(self, batch):
        return self.transfer_batch_to_device(batch, self.device, 0)

    def configure_optimizers(self):
        params = [p for p in self.merged.coefficients.parameters() if p.requires_grad]
        return build_optimizer(self.optimizer_name, params, self.lr, self.weight_decay)

    # ------------------------------------------------------------------ training
    def step_loss(self, batch: Mapping[str, Mapping]) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted loss of one ``{task: batch}`` step, with one merge shared by all tasks."""
        params = self.merged.merged_parameters()
        split = self.per_task_backward and torch.is_grad_enabled()
        inputs = {k: v.detach().requires_grad_() for k, v in params.items()} if split else params
        scaler = self._loss_scaler() if split else None
        total: Tensor | float = 0.0
        logs: dict[str, Tensor] = {}
        for name, weighted, loss, task_logs in self.loss.terms(self.merged, inputs, batch):
            if split and weighted.requires_grad:  # frees this task's activations; gradients gather on `inputs`
                (weighted if scaler is None else scaler.scale(weighted)).backward()
                weighted = weighted.detach()
            total = total + weighted
            logs[f"{name}/loss"] = loss.detach()
            logs.update({f"{name}/{k}": v for k, v in task_logs.items()})
        if split:
            grads = [inputs[k].grad for k in params]
            if scaler is not None:  # Lightning scales the returned loss again: inject unscaled gradients
                scale = scaler.get_scale()
                grads = [None if g is None else g / scale for g in grads]
            total = total + _InjectGradients.apply(grads, *params.values())
        penalty = self.objective.penalty(self.merged)
        if penalty is not None:
            total = total + penalty
            logs["penalty"] = penalty.detach()
        return total, logs

    def _loss_scaler(self):
        """The trainer's gradient scaler (``16-mixed``), or None (no trainer, or no loss scaling)."""
        return getattr(getattr(self._trainer, "precision_plugin", None), "scaler", None)

    def training_step(self, batch, batch_idx):
        loss, logs = self.step_loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in logs.items()})
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.merged.coefficients.project_()

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep checkpoints tiny: only coefficient tensors (the backbone and task vectors are inputs)."""
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k.startswith(COEFFICIENT_PREFIX)
        }
        checkpoint["adamerge_task_balance"] = {"initial": self.loss.initial}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.loss.initial = checkpoint.get("adamerge_task_balance", {}).get("initial")
        missing = [k for k in self.state_dict() if k.startswith(COEFFICIENT_PREFIX) and k not in checkpoint["state_dict"]]
        if missing:
            raise KeyError(f"checkpoint lacks coefficient tensor(s) {missing}: was it written by another recipe?")


class CheckpointFiles(TorchCheckpointIO):
    """Lightning's checkpoint files, written atomically and durably (a full disk mid-write leaves
    the previous ``last.ckpt`` whole) and read back with ``weights_only=True`` (a planted
    ``last.ckpt`` runs no code), an unreadable one named in one line."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_bytes(path, buffer.getvalue())

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint(path)
