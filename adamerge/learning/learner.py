"""The Lightning system that trains merge coefficients.

A thin shell around an exportable :class:`~adamerge.core.merged.MergedModel`: one merge per
step shared by all tasks, ``loss = Σ_task w_task · objective(task batch) + penalty``,
the constraint re-imposed after each optimiser step, and checkpoints that hold only the
coefficients and the optimiser state.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from torch import Tensor, nn

from adamerge.io.checkpoints import load_checkpoint, write_bytes
from adamerge.core.merged import MergedModel
from adamerge.objectives import Objective, ObjectiveContext, split_loss
from adamerge.objectives.balance import get_balance
from adamerge.tasks.base import Task

# The backbone, the task heads and the objectives stay in eval mode on purpose (frozen; no
# dropout): Lightning's warning about modules in eval mode at the start of training is expected.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")

COEFFICIENT_PREFIX = "merged.coefficients."


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
        selection: Objective | None = None,
        select_every_n_steps: int = 25,  # as SelectionConfig.every_n_steps
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
        self.selection = selection
        self.select_every_n_steps = select_every_n_steps
        self.best: dict | None = None
        self.lr, self.optimizer_name, self.weight_decay = lr, optimizer, weight_decay
        unknown = sorted(set(task_weights or {}) - set(self.tasks))
        if unknown:
            raise KeyError(f"task_weights names unknown task(s) {unknown}; tasks are {sorted(self.tasks)}")
        self.task_weights = {name: float((task_weights or {}).get(name, 1.0)) for name in self.tasks}
        self.balance = get_balance(task_balance)
        self.task_balance, self.guard_weight = task_balance, guard_weight
        self.initial_losses: dict[str, float] | None = None  # task_balance 'initial': each task's starting loss
        self.selection_reference: dict[str, float] | None = None  # ... and its starting held-out criterion
        self.per_task_backward = per_task_backward
        self.strict_loading = False
        self._objective_ready = False

    # ------------------------------------------------------------------ set-up
    def on_fit_start(self) -> None:
        if self._objective_ready:
            return
        datamodule = self.trainer.datamodule
        context = ObjectiveContext(
            merged=self.merged,
            tasks=self.tasks,
            calibration_batches=lambda task: (
                self._to_device(b) for b in datamodule.calibration_batches(task)
            ),
            device=self.device,
        )
        self.objective.setup(context)
        if self.selection is not None:
            self.selection.setup(context)
        if self.balance.needs_start and self.initial_losses is None:
            self.initial_losses = self._mean_losses(self.objective, datamodule.calibration_batches)
        self._objective_ready = True

    @torch.no_grad()
    def _mean_losses(self, objective: Objective, batches_for) -> dict[str, float]:
        """Each task's mean loss under ``objective`` over the batches ``batches_for(task)`` yields."""
        params = self.merged.merged_parameters()
        means = {}
        for name, task in self.tasks.items():
            losses = [
                float(split_loss(objective(task(self.merged, params, b, objective.hidden_layers), b, name))[0])
                for b in map(self._to_device, batches_for(name))
            ]
            if not losses:
                raise ValueError(f"task {name!r} has no rows to measure the objective on (is selection.holdout > 0?)")
            means[name] = sum(losses) / len(losses)
        return means

    def _to_device(self, batch):
        return self.transfer_batch_to_device(batch, self.device, 0)

    def configure_optimizers(self):
        params = [p for p in self.merged.coefficients.parameters() if p.requires_grad]
        kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
        if self.optimizer_name not in kinds:
            raise ValueError(f"unknown optimizer {self.optimizer_name!r}; use one of {sorted(kinds)}")
        return kinds[self.optimizer_name](params, lr=self.lr, weight_decay=self.weight_decay)

    # ------------------------------------------------------------------ training
    def step_loss(self, batch: Mapping[str, Mapping]) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted loss of one ``{task: batch}`` step, with one merge shared by all tasks."""
        params = self.merged.merged_parameters()
        split = self.per_task_backward and torch.is_grad_enabled()
        inputs = {k: v.detach().requires_grad_() for k, v in params.items()} if split else params
        hidden_layers = self.objective.hidden_layers
        total: Tensor | float = 0.0
        logs: dict[str, Tensor] = {}
        for name, task_batch in batch.items():
            output = self.tasks[name](self.merged, inputs, task_batch, hidden_layers)
            loss, task_logs = split_loss(self.objective(output, task_batch, name))
            weighted = self.task_weights[name] * self._balanced(loss, name)
            if split and weighted.requires_grad:
                weighted.backward()  # frees this task's activations; gradients gather on `inputs`
                weighted = weighted.detach()
            total = total + weighted
            logs[f"{name}/loss"] = loss.detach()
            logs.update({f"{name}/{k}": v for k, v in task_logs.items()})
        if split:
            total = total + _InjectGradients.apply([inputs[k].grad for k in params], *params.values())
        penalty = self.objective.penalty(self.merged)
        if penalty is not None:
            total = total + penalty
            logs["penalty"] = penalty.detach()
        return total, logs

    def _balanced(self, loss: Tensor, task: str, reference: Mapping[str, float] | None = None) -> Tensor:
        """The task's loss on the scale of ``task_balance`` (see :mod:`adamerge.objectives.balance`)."""
        if self.balance.non_negative and bool(loss.detach() < 0):
            raise ValueError(
                f"task_balance {self.task_balance!r} needs a non-negative objective; task {task!r} has loss {float(loss):.4g}"
            )
        start = (reference or self.initial_losses)[task] if self.balance.needs_start else None
        return self.balance.fn(loss, start, self.guard_weight)

    def training_step(self, batch, batch_idx):
        loss, logs = self.step_loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in logs.items()})
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.merged.coefficients.project_()

    # ------------------------------------------------------------------ label-free model selection
    @torch.no_grad()
    def held_out_criterion(self) -> float:
        """The selection objective over every task's held-out calibration rows (balanced across
        tasks the same way as the training loss)."""
        means = self._mean_losses(self.selection, self.trainer.datamodule.holdout_batches)
        if self.selection_reference is None:
            self.selection_reference = means
        per_task = [float(self._balanced(torch.tensor(v), name, self.selection_reference)) for name, v in means.items()]
        penalty = self.selection.penalty(self.merged)
        return sum(per_task) / len(per_task) + (float(penalty) if penalty is not None else 0.0)

    def _consider_current(self) -> float:
        value = self.held_out_criterion()
        if self.best is None or value < self.best["value"]:
            state = {k: v.detach().clone() for k, v in self.merged.coefficients.state_dict().items()}
            self.best = {"value": value, "step": self.global_step, "state": state}
        return value

    def on_train_start(self) -> None:
        if self.selection is not None:
            self._consider_current()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.selection is not None and self.global_step % self.select_every_n_steps == 0:
            self.log("select/criterion", self._consider_current())

    def on_train_end(self) -> None:
        """With model selection, finish on the best coefficients seen, not the last."""
        if self.selection is None:
            return
        self._consider_current()
        self.merged.coefficients.load_state_dict(self.best["state"])

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep checkpoints tiny: only coefficient tensors (the backbone and task vectors are inputs)."""
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k.startswith(COEFFICIENT_PREFIX)
        }
        checkpoint["adamerge_selection_best"] = self.best
        checkpoint["adamerge_task_balance"] = {"initial": self.initial_losses, "selection": self.selection_reference}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.best = checkpoint.get("adamerge_selection_best")
        references = checkpoint.get("adamerge_task_balance", {})
        self.initial_losses, self.selection_reference = references.get("initial"), references.get("selection")
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
