"""Expert Merging's objective: align the merged model with each task's expert.

For every task, the merged model's logits are pulled toward its expert's (temperature-scaled
KL) and its hidden states at chosen layers toward the expert's (MSE over valid tokens),
with an L1 pull of the coefficients toward their initial values. The experts' outputs are
fixed, so they are computed once over the calibration set in :meth:`setup` and looked up by
row index each step; no expert runs during training.

Reference: "Expert Merging: Model Merging with Unsupervised Expert Alignment and
Importance-Guided Layer Chunking" (2025). The expert is rebuilt from its task vector,
``θ_0 + τ_k`` over the merge scope: keep everything the experts changed inside the scope
(use ``coefficients.freeze`` rather than a narrower scope for tensors that should not learn).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from adamerge.core.merged import MergedModel
from adamerge.objectives.base import OBJECTIVES, Objective, ObjectiveContext
from adamerge.tasks.base import TaskOutput


def per_sample_rows(output: TaskOutput, batch_size: int) -> list[int]:
    """How many logit rows each sample of the batch produced."""
    if output.sample_rows is not None:
        return [int(n) for n in output.sample_rows]
    if output.logits.shape[0] != batch_size:
        raise ValueError("a task with several predictions per sample must set TaskOutput.sample_rows")
    return [1] * batch_size


def valid_positions(hidden: Tensor, mask: Tensor | None) -> list[Tensor]:
    """Per sample, its hidden states at valid positions (``[T_i, H]``, or ``[1, H]`` for pooled)."""
    if hidden.dim() == 2:
        return [h.unsqueeze(0) for h in hidden]
    if mask is None:
        return list(hidden)
    return [h[m.bool()] for h, m in zip(hidden, mask)]


def kl_to_teacher(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, averaged over rows.

    A KL is never negative, but its float32 sum can round to a few ulps below zero when student
    and teacher agree (e.g. −5e-9); it is clamped at zero, so balances that need a non-negative
    loss (``task_balance: guarded``) never refuse a perfectly aligned task."""
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return temperature**2 * F.kl_div(student, teacher, log_target=True, reduction="batchmean").clamp(min=0.0)


def top_k_targets(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Each row's ``k`` most likely tokens under the teacher at ``temperature``: their
    log-probabilities ``[N, k]`` (float32) and indices ``[N, k]`` (int32) — all a top-k KL needs,
    ``k/V`` of the full targets (arcee-ai/DAM stores teacher logits the same way)."""
    log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    values, indices = log_p.topk(min(k, log_p.shape[-1]), dim=-1)
    return values, indices.to(torch.int32)


def _log_rest(log_top: Tensor) -> Tensor:
    """``log(1 − Σ exp(log_top))`` per row: the log-mass outside the kept tokens."""
    kept = torch.logsumexp(log_top, dim=-1).clamp(max=0.0)
    return torch.log((-torch.expm1(kept)).clamp(min=1e-30))


def top_k_kl(student_logits: Tensor, teacher_log_top: Tensor, top_indices: Tensor, temperature: float = 1.0) -> Tensor:
    """``T² · KL(p ‖ q)`` over the teacher's top-k tokens plus one bucket holding the rest of the
    mass (for teacher and student alike), averaged over rows: exactly the full KL when ``k = V``,
    and never negative (a KL between the two coarse-grained distributions)."""
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q_top = log_q.gather(-1, top_indices.long())
    log_p = torch.cat([teacher_log_top, _log_rest(teacher_log_top)[:, None]], dim=-1)
    log_q = torch.cat([log_q_top, _log_rest(log_q_top)[:, None]], dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()
    return temperature**2 * kl.clamp(min=0.0)


def coefficient_drift(merged: MergedModel) -> Tensor:
    """Mean ``|c − c_init|`` over the trainable coefficients."""
    coefficients = merged.coefficients
    trainable = coefficients.layout.trainable_slots
    return (coefficients() - coefficients.initial)[:, trainable].abs().mean()


@OBJECTIVES.register("alignment")
class ExpertAlignment(Objective):
    """KL to each task's expert logits + MSE to its hidden states + γ·mean|c − c_init|.

    ``task_experts`` maps a task to the expert it is aligned with (default: the expert of the
    same name); ``task_weights`` are the per-task β of Expert Merging. Targets are kept for the
    rows the task predicts (a causal LM's loss-masked answer tokens); ``top_k``: keep only each
    row's ``k`` most likely expert tokens and the rest's mass, and take the KL on that support
    (:func:`top_k_kl`), for large vocabularies.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        logits_weight: float = 1.0,
        hidden_weight: float = 1.0,
        hidden_layers: Sequence[int] = (),
        l1_weight: float = 0.0,
        task_experts: Mapping[str, str] | None = None,
        task_weights: Mapping[str, float] | None = None,
        top_k: int | None = None,
    ):
        super().__init__()
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be a positive number of tokens, got {top_k}")
        self.top_k = top_k
        self.temperature = temperature
        self.logits_weight, self.hidden_weight, self.l1_weight = logits_weight, hidden_weight, l1_weight
        self.hidden_layers = tuple(hidden_layers) if hidden_weight else ()
        self.task_experts = dict(task_experts or {})
        self.task_weights = dict(task_weights or {})
        self.targets: dict[str, dict[str, list[Tensor]]] = {}

    def expert_for(self, task: str, merged: MergedModel) -> str:
        expert = self.task_experts.get(task, task)
        if expert not in merged.expert_names:
            raise KeyError(
                f"alignment: task {task!r} has no expert of the same name; map it with "
                f"task_experts={{{task!r}: <one of {list(merged.expert_names)}>}}"
            )
        return expert

    @torch.no_grad()
    def setup(self, context: ObjectiveContext) -> None:
        merged = context.merged
        for name, task in context.tasks.items():
            params = merged.expert_parameters(self.expert_for(name, merged))
            logits: list[Tensor] = []
            indices: list[Tensor] = []
            hidden: dict[int, list[Tensor]] = {i: [] for i in self.hidden_layers}
            order: list[int] = []
            for batch in context.calibration_batches(name):
                output = task(merged, params, batch, self.hidden_layers)
                rows = per_sample_rows(output, len(batch["index"]))
                if self.top_k is None:
                    logits.extend(output.logits.float().split(rows))
                else:
                    top, where = top_k_targets(output.logits, self.top_k, self.temperature)
                    logits.extend(top.split(rows))
                    indices.extend(where.split(rows))
                for layer in self.hidden_layers:
                    hidden[layer].extend(h.float() for h in valid_positions(output.hidden[layer], output.mask))
                order.extend(batch["index"].tolist())
            if order != list(range(len(order))):
                raise ValueError(f"alignment: calibration batches of task {name!r} are not in row order")
            self.targets[name] = {"logits": logits, "indices": indices, **{f"hidden{i}": h for i, h in hidden.items()}}

    def forward(self, output, batch, task):
        if task not in self.targets:
            raise RuntimeError("alignment objective used before setup(): no expert targets for task " + repr(task))
        targets = self.targets[task]
        index = batch["index"].tolist()
        logs = {}
        loss = output.logits.new_zeros(())
        if self.logits_weight:
            kl = self._kl(output.logits, targets, index)
            loss = loss + self.logits_weight * kl
            logs["kl"] = kl.detach()
        for layer in self.hidden_layers:
            student = torch.cat(valid_positions(output.hidden[layer], output.mask)).float()
            target = torch.cat([targets[f"hidden{layer}"][i] for i in index]).to(student.device)
            mse = F.mse_loss(student, target)
            loss = loss + self.hidden_weight * mse / len(self.hidden_layers)
            logs[f"mse{layer}"] = mse.detach()
        return self.task_weights.get(task, 1.0) * loss, logs

    def penalty(self, merged):
        return self.l1_weight * coefficient_drift(merged) if self.l1_weight else None

    def _kl(self, student: Tensor, targets: Mapping[str, list[Tensor]], index: list[int]) -> Tensor:
        """The KL to the expert on these rows, from the full targets or the top-k ones."""
        teacher = torch.cat([targets["logits"][i] for i in index]).to(student.device)
        if self.top_k is None:
            return kl_to_teacher(student, teacher, self.temperature)
        indices = torch.cat([targets["indices"][i] for i in index]).to(student.device)
        return top_k_kl(student, teacher, indices, self.temperature)


@OBJECTIVES.register("expert_kl")
class ExpertKL(ExpertAlignment):
    """Logit alignment only: KL to each task's expert predictions (cheap; no hidden states)."""

    def __init__(
        self,
        temperature: float = 1.0,
        l1_weight: float = 0.0,
        task_experts: Mapping[str, str] | None = None,
        task_weights: Mapping[str, float] | None = None,
        top_k: int | None = None,
    ):
        super().__init__(
            temperature=temperature,
            hidden_weight=0.0,
            l1_weight=l1_weight,
            task_experts=task_experts,
            task_weights=task_weights,
            top_k=top_k,
        )


@OBJECTIVES.register("l1_to_init")
class L1ToInit(Objective):
    """Only a penalty: ``mean|c − c_init|``, to combine with another objective."""

    def forward(self, output, batch, task):
        return output.logits.new_zeros(())

    def penalty(self, merged):
        return coefficient_drift(merged)
