"""FW-Merging: Frank-Wolfe over a pool of checkpoints (Chen et al. 2025, arXiv:2503.12649).

The merged weights ``θ_t`` walk inside the convex hull of the pool. Each iteration takes the
gradient ``g = ∇_θ f(θ_t)`` of the objective on a few calibration batches, asks the linear
minimisation oracle which member ``θ_k`` minimises ``<g, θ_k − θ_t>`` (for the whole model,
or separately for every tensor), and moves toward it:

- hard: ``θ_{t+1} = θ_t + γ_t (θ_{k*} − θ_t)`` with ``γ_t = step_size · 2/(t+2)``;
- soft: the ``m`` best members become directions ``d_j = θ_{k_j} − θ_t`` whose step sizes are
  learned AdaMerging-style (a :class:`MergedModel` over the directions, init 0, clamped to
  ``[0, 1]`` so every step moves toward the chosen members).

Why this shape: the state is ``θ_t`` itself, written into the backbone, and pool members are
read one tensor at a time (safetensors files stay memory-mapped), so memory does not grow
with the pool, unlike learning one coefficient per task vector, which holds all ``K`` vectors
(a task-arithmetic or coefficients start holds the ``K`` vectors of one tensor at a time).
The pieces are the coefficient learner's: the merge scope and pool checks of
:mod:`~adamerge.core.task_vectors`, the :class:`MergedModel` merge for the start, and the
weighted, balanced :class:`~adamerge.learning.loss.TaskLoss` as the objective.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from adamerge.core.coefficients import MergeCoefficients
from adamerge.core.constraints import Clamp
from adamerge.core.layouts import build_layout
from adamerge.core.merged import FunctionalModel, MergedModel
from adamerge.core.scope import Patterns, expert_tensors, name_experts, scope_keys
from adamerge.core.task_vectors import TaskVectors
from adamerge.io.terminal import progress
from adamerge.io.checkpoints import WeightsSource, open_weights
from adamerge.io.lora import is_adapter, open_adapter
from adamerge.learning.data import CalibrationData
from adamerge.learning.learner import CoefficientLearner, frozen_modules_expected
from adamerge.learning.loss import TaskLoss
from adamerge.objectives import Objective, WeightedObjectives
from adamerge.tasks.base import Task

MODES = ("hard", "soft")
LMOS = ("model", "tensor")


@dataclass
class FrankWolfeResult:
    """The merged model (its backbone holds the final weights), the merge scope and one record per iteration."""

    model: FunctionalModel
    keys: list[str]
    history: list[dict]

    def merged_parameters(self) -> dict[str, Tensor]:
        base = self.model.base_tensors()
        return {key: base[key] for key in self.keys}


def schedule(t: int, step_size: float = 1.0) -> float:
    """The classic Frank-Wolfe step ``γ_t = step_size · 2/(t+2)`` (``γ_0 = step_size``)."""
    return step_size * 2.0 / (t + 2)


def scope(backbone: nn.Module, pool: Mapping[str, WeightsSource], include: Patterns = None, exclude: Patterns = None) -> list[str]:
    """The merge scope (as :meth:`TaskVectors.from_models` chooses it), after checking every pool
    member against it as an expert is checked; errors name the member and the key. Reads one tensor at a time."""
    base = open_weights(backbone)
    keys = scope_keys(backbone, base, include, exclude)
    for name, source in pool.items():
        for _ in expert_tensors(name, source, backbone, base, keys, include, exclude, role="pool member"):
            pass
    return keys


def _open_adapters(backbone: nn.Module, pool: Mapping[str, WeightsSource]) -> dict[str, WeightsSource]:
    """Pool members given as PEFT LoRA adapter folders, opened as ``θ_0 + ΔW`` (:mod:`adamerge.io.lora`)
    over a copy of the pretrained weights: the walk overwrites the backbone's, and ΔW is relative to θ_0."""
    folders = [name for name, source in pool.items() if isinstance(source, (str, PathLike)) and is_adapter(source)]
    if not folders:
        return dict(pool)
    pretrained = {key: tensor.detach().clone() for key, tensor in backbone.state_dict().items()}
    return {name: open_adapter(source, pretrained, f"pool member {name!r}") if name in folders else source
            for name, source in pool.items()}


@torch.no_grad()
def write_start(
    backbone: nn.Module, pool: Mapping[str, WeightsSource], keys: Sequence[str], start: str, scaling: float = 0.3
) -> None:
    """Write ``θ_0`` into the backbone: ``pretrained`` (as is), ``task_arithmetic``
    (``θ_pre + λ Σ_k τ_k``) or a coefficients file of an earlier run (``θ_pre + Σ_k c_k ⊙ τ_k``).

    The merged weights are a :class:`MergedModel`'s, built one tensor at a time over coefficients
    shared by all tensors: only the ``K`` task vectors of one tensor are held at once."""
    if start == "pretrained":
        return
    if start == "task_arithmetic":
        shapes = {key: tuple(p.shape) for key, p in backbone.named_parameters() if key in keys}
        coefficients = MergeCoefficients(build_layout(list(pool), shapes, "task"), init=scaling)
    else:
        coefficients = _start_coefficients(start, pool, keys)
    # opened once, read one tensor at a time below (not re-opened, or re-listed, for every tensor)
    experts = {name: open_weights(pool[name], f"pool member {name!r}") for name in coefficients.layout.expert_names}
    device = next(backbone.parameters()).device
    params = dict(backbone.named_parameters())
    for key in keys:
        with warnings.catch_warnings():  # an expert may leave one tensor as it was
            warnings.filterwarnings("ignore", message=".*identical to the pretrained model.*")
            vectors = TaskVectors.from_models(backbone, experts, include=f"^{re.escape(key)}$", device=device)
        merged = MergedModel(backbone, vectors, coefficients=coefficients)
        params[key].copy_(merged.merged_parameters()[key])


def _start_coefficients(start: str, pool: Mapping, keys: Sequence[str]) -> MergeCoefficients:
    path = Path(start).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"start {start!r} is not 'pretrained', 'task_arithmetic' or a coefficients file")
    coefficients = MergeCoefficients.load(path)
    missing = [n for n in coefficients.layout.expert_names if n not in pool]
    if missing:
        raise KeyError(f"start coefficients {path} use expert {missing[0]!r}, which is not in the pool {list(pool)}")
    if set(coefficients.layout.keys) != set(keys):
        odd = sorted(set(coefficients.layout.keys) ^ set(keys))[0]
        raise ValueError(f"start coefficients {path} cover different tensors than the merge scope, e.g. {odd!r}")
    return coefficients


# ---------------------------------------------------------------------- the objective and its gradient


def objective_gradient(model, keys, loss: TaskLoss, batches) -> tuple[float, dict[str, Tensor | None]]:
    """``f(θ_t)`` (mean over the batches) and ``∇_θ f`` for every scope tensor (None where ``f`` does not reach it)."""
    base = model.base_tensors()
    params = {key: base[key].detach().requires_grad_() for key in keys}
    value = 0.0
    for batch in batches:
        total = loss(model, params, batch) / len(batches)
        if not total.requires_grad:
            raise ValueError("the objective does not depend on any tensor of the merge scope")
        total.backward()
        value += float(total.detach())
    return value, {key: p.grad for key, p in params.items()}


@torch.no_grad()
def objective_value(model, keys, loss: TaskLoss, batches) -> float:
    base = model.base_tensors()
    params = {key: base[key] for key in keys}
    return sum(float(loss(model, params, b)) for b in batches) / len(batches)


@torch.no_grad()
def member_scores(
    gradient: Mapping[str, Tensor | None], theta: Mapping[str, Tensor], source: WeightsSource
) -> dict[str, float]:
    """``<g, θ_k − θ_t>`` per tensor for one pool member (the LMO's linear model); tensors without gradient score 0."""
    weights = open_weights(source)
    scores = {}
    for key, g in gradient.items():
        if g is None:
            scores[key] = 0.0
            continue
        difference = weights[key].to(g.device, torch.float32) - theta[key].float()
        scores[key] = float(torch.dot(g.flatten().float(), difference.flatten()))
    return scores


def _check_objective(objective: Objective) -> None:
    parts = list(objective.parts) if isinstance(objective, WeightedObjectives) else [objective]
    for part in parts:
        if type(part).setup is not Objective.setup or type(part).penalty is not Objective.penalty:
            raise ValueError(
                f"objective {type(part).__name__} precomputes targets or penalises coefficients; FW-Merging "
                "scores merged weights, so use an objective of the task outputs alone (entropy, cross_entropy, infomax)"
            )


# ---------------------------------------------------------------------- steps


@torch.no_grad()
def _move_toward(params: Mapping[str, nn.Parameter], source: WeightsSource, keys: Sequence[str], gamma: float) -> None:
    weights = open_weights(source)
    for key in keys:
        param = params[key]
        param.copy_(param.float().lerp(weights[key].to(param.device).float(), gamma))


class _PerTensor(Mapping):
    """A direction made of a different pool member per tensor (per-tensor LMO), read lazily."""

    def __init__(self, choice: Mapping[str, str | None], members: Mapping[str, Mapping[str, Tensor]], current):
        self.choice, self.members, self.current = choice, members, current

    def __getitem__(self, key: str) -> Tensor:
        name = self.choice[key]
        return self.current[key] if name is None else self.members[name][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.choice)

    def __len__(self) -> int:
        return len(self.choice)


def _soft_step(
    model, pool, keys, loss: TaskLoss, ranking, stream, *, lmo, directions, inner_steps, inner_lr, inner_granularity, include, exclude,
) -> dict:
    """Learn the step sizes toward the ``directions`` best members (AdaMerging-style); write ``θ_{t+1}``."""
    backbone = model.backbone
    if lmo == "model":
        chosen = ranking[:directions]
        choices = {name: dict.fromkeys(keys, name) for name in chosen}
    else:
        chosen = {key: r[:directions] for key, r in ranking.items() if r}
        choices = {f"top{j + 1}": {k: r[j] if r else None for k, r in ranking.items()} for j in range(directions)}
    # members as weights θ_k, so each direction is θ_k − θ_t (a LoRA member's own τ would be θ_k − θ_0)
    members = {name: open_weights(pool[name]) for choice in choices.values() for name in set(choice.values()) - {None}}
    current = dict(backbone.named_parameters())
    experts = {label: _PerTensor(choice, members, current) for label, choice in choices.items()}
    device = next(backbone.parameters()).device
    vectors = TaskVectors.from_models(backbone, experts, include=include, exclude=exclude, device=device)
    merged = MergedModel(backbone, vectors, granularity=inner_granularity, init=0.0, constraint=Clamp(0.0, 1.0))
    learner = CoefficientLearner(
        merged, loss.tasks, loss.objective, lr=inner_lr, task_weights=loss.weights,
        task_balance=loss.task_balance, guard_weight=loss.guard_weight,
    )
    learner.loss.initial = loss.initial  # balanced against the losses at FW's start, not at this iteration's
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = rank_zero.level
    rank_zero.setLevel(logging.WARNING)  # no banner per iteration
    try:
        trainer = L.Trainer(
            max_steps=inner_steps,
            accelerator="cpu" if device.type == "cpu" else "gpu",
            devices=[device.index or 0] if device.type == "cuda" else 1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        with frozen_modules_expected():
            trainer.fit(learner, train_dataloaders=stream)
    finally:
        rank_zero.setLevel(level)
    learner.eval()
    with torch.no_grad():
        new = merged.merged_parameters()
        params = dict(backbone.named_parameters())
        for key in keys:
            params[key].copy_(new[key])
    return {"chosen": chosen, "gamma": merged.coefficients.as_dict()}


def _hard_step(params, pool, ranking, keys, lmo: str, gamma: float) -> dict:
    """Move ``γ`` of the way toward the best member (whole model) or each tensor's best member."""
    if lmo == "model":
        chosen = ranking[0]
        _move_toward(params, pool[chosen], keys, gamma)
    else:
        chosen = {key: r[0] for key, r in ranking.items() if r}
        for name in dict.fromkeys(chosen.values()):
            _move_toward(params, pool[name], [k for k, n in chosen.items() if n == name], gamma)
    return {"chosen": chosen, "gamma": gamma}


def _rank(gradient, params, pool, keys, lmo: str) -> tuple[list | dict, dict[str, float]]:
    """The LMO: members from the most to the least aligned with −∇ (per tensor for ``lmo='tensor'``;
    a tensor the objective does not reach ranks None and keeps its value), and each member's score."""
    per_tensor = {name: member_scores(gradient, params, source) for name, source in pool.items()}
    scores = {name: sum(s.values()) for name, s in per_tensor.items()}
    if lmo == "model":
        return sorted(pool, key=scores.__getitem__), scores
    ranking = {k: sorted(pool, key=lambda n: per_tensor[n][k]) if gradient[k] is not None else None for k in keys}
    return ranking, scores


def _check_options(mode, lmo, iterations, step_size, batches_per_iteration, inner_steps, directions, pool_size) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown FW-Merging mode {mode!r}; use one of {MODES}")
    if lmo not in LMOS:
        raise ValueError(f"unknown LMO {lmo!r}; use one of {LMOS}")
    if iterations < 0 or batches_per_iteration < 1 or inner_steps < 1:
        raise ValueError("iterations must be >= 0, batches_per_iteration and inner_steps >= 1")
    if not 0.0 < step_size <= 1.0:
        raise ValueError(f"step_size must be in (0, 1] so that each step interpolates toward a member, got {step_size}")
    if mode == "soft" and not 1 <= directions <= pool_size:
        raise ValueError(f"directions must be between 1 and the pool size {pool_size}, got {directions}")


# ---------------------------------------------------------------------- the loop


def frank_wolfe_merge(
    backbone: nn.Module,
    pool: Mapping[str, WeightsSource] | Sequence[WeightsSource],
    tasks: Mapping[str, Task],
    data: CalibrationData,
    objective: Objective,
    *,
    mode: str = "hard",
    iterations: int = 10,
    step_size: float = 1.0,
    lmo: str = "model",
    batches_per_iteration: int = 2,
    start: str = "pretrained",
    start_scaling: float = 0.3,
    directions: int = 2,
    inner_steps: int = 50,
    inner_lr: float = 1e-2,
    inner_granularity: str = "layer",
    include: Patterns = None,
    exclude: Patterns = None,
    task_weights: Mapping[str, float] | None = None,
    task_balance: str = "sum",
    guard_weight: float = 4.0,
    device: torch.device | str | None = None,
) -> FrankWolfeResult:
    """Run FW-Merging from ``start`` for ``iterations`` steps and return the merged model and its history.

    The backbone (the pretrained model) is modified in place and ends holding the merged
    weights; pass a copy to keep it. ``pool`` maps names to weights sources (safetensors files
    and HF directories are read lazily, one tensor at a time; PEFT LoRA adapter folders as
    ``θ_0 + ΔW`` over one copy of the pretrained weights, held while the walk runs). Each iteration draws
    ``batches_per_iteration`` steps (one batch per task each) from ``data``'s calibration stream.
    The objective is the coefficient learner's :class:`TaskLoss` (``task_weights``, ``task_balance``;
    the balances that need a starting loss measure it at ``θ_0`` over the calibration rows).
    """
    pool = _open_adapters(backbone, name_experts(pool))
    _check_options(mode, lmo, iterations, step_size, batches_per_iteration, inner_steps, directions, len(pool))
    _check_objective(objective)
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    model = FunctionalModel(backbone).to(device)
    tasks = {name: task.to(device).eval() for name, task in tasks.items()}
    loss = TaskLoss(tasks, objective, task_weights, task_balance, guard_weight)
    keys = scope(backbone, pool, include, exclude)
    write_start(backbone, pool, keys, start, start_scaling)
    if loss.balance.needs_start:
        loss.initial = loss.mean_losses(
            model, model.base_tensors(), objective, lambda name: (move_data_to_device(b, device) for b in data.calibration_batches(name))
        )
    params = dict(backbone.named_parameters())
    stream = data.train_dataloader()
    batches_of = iter(stream)

    history = []
    for t in progress(range(iterations), f"FW-Merging ({mode})", unit="iteration"):
        batches = [move_data_to_device(next(batches_of), device) for _ in range(batches_per_iteration)]
        before, gradient = objective_gradient(model, keys, loss, batches)
        ranking, scores = _rank(gradient, params, pool, keys, lmo)
        del gradient
        if mode == "hard":
            record = _hard_step(params, pool, ranking, keys, lmo, schedule(t, step_size))
        else:
            record = _soft_step(
                model, pool, keys, loss, ranking, stream, lmo=lmo, directions=directions, inner_steps=inner_steps,
                inner_lr=inner_lr, inner_granularity=inner_granularity, include=include, exclude=exclude,
            )
        after = objective_value(model, keys, loss, batches)
        history.append({"iteration": t, **record, "scores": scores, "objective_before": before, "objective_after": after})
    return FrankWolfeResult(model, keys, history)
