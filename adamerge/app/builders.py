"""One builder per recipe section: each reads its own section (and the problem) and returns the
object the jobs in :mod:`adamerge.app.runner` use, so the runner reads as a short script
(validate → set up → train → save), as torchtune's recipes do."""

from __future__ import annotations

import importlib
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig

from adamerge.app.checks import RecipeError
from adamerge.app.config import to_plain
from adamerge.app.problems.problem import MergeProblem
from adamerge.core.coefficients import MergeCoefficients
from adamerge.core.constraints import make_constraint
from adamerge.core.element import ElementCoefficients
from adamerge.core.importance import resolve_chunks
from adamerge.core.layouts import build_layout
from adamerge.core.merged import MergedModel
from adamerge.core.scope import in_scope
from adamerge.core.task_vectors import TaskVectors
from adamerge.learning.data import CalibrationData, by_length, ordered_batches
from adamerge.learning.learner import CheckpointFiles, CoefficientLearner
from adamerge.learning.placement import resolve_placement
from adamerge.learning.progress import StepProgressBar
from adamerge.learning.selection import LabelFreeSelection
from adamerge.learning.streamed_merge import StreamedMergedModel
from adamerge.methods.base import START, with_start
from adamerge.methods.tsv import tsv_task_vectors
from adamerge.objectives import Objective, WeightedObjectives, build_objective


def merge_scope(recipe: DictConfig, problem: MergeProblem) -> dict:
    """``task_vectors.include/exclude`` regexes, falling back to the problem's default scope."""
    cfg = recipe.task_vectors
    return {
        "include": to_plain(cfg.include) if cfg.include is not None else problem.include,
        "exclude": to_plain(cfg.exclude) if cfg.exclude is not None else problem.exclude,
    }


def task_weights(recipe: DictConfig) -> dict[str, float]:
    """``problem.tasks.<task>.weight``: each task's weight in the loss."""
    return {name: task.weight for name, task in recipe.problem.tasks.items()}


def build_task_vectors(recipe: DictConfig, problem: MergeProblem) -> TaskVectors:
    """``task_vectors``: τ_k over the scope, in the storage dtype, TIES/DARE/TSV-processed if asked."""
    cfg = recipe.task_vectors
    tv = TaskVectors.from_models(
        problem.pretrained, problem.experts, dtype=cfg.dtype, low_rank=cfg.low_rank, **merge_scope(recipe, problem)
    )
    if cfg.ties is not None:
        tv = tv.ties(cfg.ties.density, cfg.ties.scope, cfg.ties.sign_method)
    if cfg.dare is not None:
        tv = tv.dare(cfg.dare.density, cfg.dare.seed, cfg.dare.rescale)
    if cfg.tsv is not None:
        tv = tsv_task_vectors(tv, cfg.tsv.alpha)
    if cfg.start is not None:
        tv = with_start(tv, problem.pretrained, problem.experts, cfg.start.method, to_plain(cfg.start.args),
                        **merge_scope(recipe, problem))
    return tv


def _per_tensor(init, names: list[str], shapes: dict[str, tuple[int, ...]]):
    """``coefficients.init`` as the coefficients take it: values per expert and tensor (``{expert:
    {tensor: value}}``, e.g. a mergekit YAML's weights) become layer-wise coefficients over the merged
    tensors (values for other tensors are ignored), which every granularity starts from."""
    if not isinstance(init, dict) or not any(isinstance(v, dict) for v in init.values()):
        return init
    unknown = sorted(set(init) - set(names))
    if unknown:
        raise RecipeError(f"coefficients.init.{unknown[0]}: not an expert of this merge {names}")
    layout = build_layout(names, shapes, "layer")
    values = torch.zeros(layout.num_experts, layout.num_slots)
    for k, name in enumerate(names):
        per_tensor = init.get(name)
        if not isinstance(per_tensor, dict):
            raise RecipeError(f"coefficients.init.{name}: expected {{tensor: value}} as for the other experts, got {per_tensor!r}")
        for key, slots in layout.tensor_slots.items():
            value = per_tensor.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RecipeError(f"coefficients.init.{name}: expected a number for tensor {key}, got {value!r}")
            values[k, slots[0]] = float(value)
    return MergeCoefficients(layout, init=values)


def _init(recipe: DictConfig, task_vectors: TaskVectors):
    """``coefficients.init``; with ``task_vectors.start``, 1 for the start vector and ``init`` for the experts."""
    init = to_plain(recipe.coefficients.init)
    if recipe.task_vectors.start is None:
        shapes = {key: tuple(task_vectors.shape(key)[1:]) for key in task_vectors.keys}
        return _per_tensor(init, list(task_vectors.expert_names), shapes)
    return _start_init(init, task_vectors.expert_names[1:])


def _start_init(init, experts: list[str]):
    """With a data-free start: its vector at 1, the experts' at ``init`` (a number or one per expert)."""
    if isinstance(init, (int, float)):
        return {START: 1.0, **{name: float(init) for name in experts}}
    if isinstance(init, dict) and not any(isinstance(v, dict) for v in init.values()):
        return {START: 1.0, **init}
    raise RecipeError(f"coefficients.init: with task_vectors.start, give a number or one per expert, not {init!r}")


def build_merged(recipe: DictConfig, problem: MergeProblem, task_vectors: TaskVectors) -> MergedModel:
    """``coefficients`` over the task vectors: the merged model whose coefficients train."""
    cfg = recipe.coefficients
    return MergedModel(
        problem.pretrained,
        task_vectors,
        granularity=cfg.granularity,
        init=_init(recipe, task_vectors),
        constraint=make_constraint(to_plain(cfg.constraint)),
        groups=to_plain(cfg.groups),
        chunks=resolve_chunks(to_plain(cfg.chunks), task_vectors),
        rank=cfg.rank,
        freeze=to_plain(cfg.freeze),
        offload_vectors=recipe.task_vectors.offload,
    )


def build_streamed_merged(recipe: DictConfig, problem: MergeProblem, device, work_dir: Path) -> StreamedMergedModel:
    """``trainer.stream``: the merged model read, merged and dropped block by block as it runs; each
    block's task vectors (and a ``task_vectors.start``'s update of it) cached in the run's work folder."""
    coefficients, keys = build_coefficients(recipe, problem)
    return StreamedMergedModel(
        problem.pretrained, problem.pretrained_weights, problem.experts, coefficients, keys, work_dir / "vectors",
        dtype=recipe.task_vectors.dtype, device=device, stage_vectors=stage_start(recipe, problem),
        progress=recipe.trainer.progress_bar,
    )


def build_coefficients(recipe: DictConfig, problem: MergeProblem) -> tuple[MergeCoefficients | ElementCoefficients, list[str]]:
    """``coefficients`` laid out from the pretrained shapes alone (no task vector is read: progressive
    learning reads them block by block), and the merged tensors' names; with ``task_vectors.start``
    the start's row comes first, at 1."""
    scope = merge_scope(recipe, problem)
    shapes = {
        name: tuple(p.shape) for name, p in problem.pretrained.named_parameters()
        if p.is_floating_point() and in_scope(name, **scope)
    }
    cfg = recipe.coefficients
    experts = list(problem.experts)
    names = [START, *experts] if recipe.task_vectors.start is not None else experts
    layout = build_layout(
        names, shapes, cfg.granularity,
        groups=to_plain(cfg.groups), chunks=to_plain(cfg.chunks), freeze=to_plain(cfg.freeze),
    )
    constraint = make_constraint(to_plain(cfg.constraint))
    if recipe.task_vectors.start is not None:
        init = _start_init(to_plain(cfg.init), experts)
    else:
        init = _per_tensor(to_plain(cfg.init), experts, shapes)
    if layout.granularity == "element":
        return ElementCoefficients(layout, shapes, init=init, constraint=constraint), list(shapes)
    return MergeCoefficients(layout, init=init, constraint=constraint), list(shapes)


def build_objectives(recipe: DictConfig) -> Objective:
    """``objectives``: one registered (or dotted-path) objective, or a weighted sum of several."""
    if not recipe.objectives:
        raise ValueError("the recipe lists no objectives")
    parts = [(o.weight, build_objective(o.name, **to_plain(o.args))) for o in recipe.objectives]
    if len(parts) == 1 and parts[0][0] == 1.0:
        return parts[0][1]
    return WeightedObjectives(parts, names=[o.name for o in recipe.objectives])


def build_selection(recipe: DictConfig, training: Objective | None = None) -> LabelFreeSelection | None:
    """``selection``: the callback keeping the coefficients with the best held-out criterion. When its
    objective is one the run trains on (same name and arguments), it is that instance of ``training``,
    whose expert targets over the calibration set serve the held-out rows too (not a second copy)."""
    if recipe.selection is None:
        return None
    spec = (recipe.selection.objective.name, to_plain(recipe.selection.objective.args))
    parts = list(training.parts) if isinstance(training, WeightedObjectives) else [training]
    shared = [part for o, part in zip(recipe.objectives, parts) if part is not None and (o.name, to_plain(o.args)) == spec]
    objective = shared[0] if shared else build_objective(spec[0], **spec[1])
    return LabelFreeSelection(objective, recipe.selection.every_n_steps)


def build_learner(recipe: DictConfig, problem: MergeProblem, merged: MergedModel) -> CoefficientLearner:
    """``objectives``, ``optimizer``, ``task_balance`` and the tasks' weights around the merged model."""
    return CoefficientLearner(
        merged,
        problem.tasks,
        build_objectives(recipe),
        lr=recipe.optimizer.lr,
        optimizer=recipe.optimizer.name,
        weight_decay=recipe.optimizer.weight_decay,
        task_weights=task_weights(recipe),
        task_balance=recipe.task_balance,
        guard_weight=recipe.guard_weight,
        per_task_backward=recipe.trainer.per_task_backward,
    )


def build_data(recipe: DictConfig, problem: MergeProblem) -> CalibrationData:
    """The calibration stream (``trainer.batch_size`` rows per task per step), held-out rows for
    ``selection``, and the evaluation rows."""
    missing = [t for t in problem.tasks if t not in problem.calibration]
    if missing and recipe.method is None:  # learning on the other tasks alone would ignore these silently
        raise ValueError(f"task(s) {missing} have no calibration data (problem.tasks.<task>.calibration); only `adamerge merge` runs without")
    return CalibrationData(
        problem.calibration,
        problem.collate,
        batch_size=recipe.trainer.batch_size,
        seed=recipe.seed,
        evaluation=problem.evaluation,
        eval_batch_size=recipe.evaluation.batch_size,
        holdout=recipe.selection.holdout if recipe.selection is not None else 0.0,
        workers=recipe.trainer.data_workers,
        pin_memory=resolve_placement(recipe.trainer).on_gpu,
    )


def stage_start(recipe: DictConfig, problem: MergeProblem):
    """``task_vectors.start`` for progressive learning: each stage's task vectors with the start
    method's update of that stage's tensors first (computed from those tensors alone, so per-tensor
    methods give exactly their whole-model merge), or None without a start."""
    start = recipe.task_vectors.start
    if start is None:
        return None
    args = to_plain(start.args)

    def with_stage_start(vectors: TaskVectors, pretrained, include) -> TaskVectors:
        return with_start(vectors, pretrained, problem.experts, start.method, args, include=include)

    return with_stage_start


def progressive_batches(recipe: DictConfig, problem: MergeProblem, data: CalibrationData) -> dict[str, list]:
    """``progressive.samples_per_task``: the first rows of each task, batched by length (padding
    costs compute, not accuracy)."""
    samples, batch_size = recipe.progressive.samples_per_task, recipe.trainer.batch_size
    return {
        name: list(ordered_batches(name, rows, batch_size, data.collate_for(name), by_length(rows, range(min(samples, len(rows))))))
        for name, rows in problem.calibration.items()
    }


def build_trainer(recipe: DictConfig, work_dir: Path) -> L.Trainer:
    """``trainer``: Lightning's Trainer with the run's checkpoints (atomic, tiny), its CSV log beside
    the recipe's loggers and callbacks, and any other Trainer argument from ``trainer.extra``."""
    cfg = recipe.trainer
    checkpoint = ModelCheckpoint(dirpath=work_dir / "checkpoints", filename="step{step}",
                                 every_n_train_steps=cfg.checkpoint_every_n_steps, save_last=True, save_top_k=0)
    managed = dict(
        max_steps=cfg.max_steps,
        accelerator=cfg.accelerator,
        devices=to_plain(cfg.devices),
        strategy=_strategy(cfg.strategy),
        precision=to_plain(cfg.precision),
        logger=[CSVLogger(work_dir, name="", version=""),  # the run's own log (metrics.csv, resume)
                *(_instantiate(spec, f"trainer.loggers[{i}]") for i, spec in enumerate(cfg.loggers))],
        callbacks=[checkpoint, *([StepProgressBar()] if cfg.progress_bar else []),
                   *(_instantiate(spec, f"trainer.callbacks[{i}]") for i, spec in enumerate(cfg.callbacks))],
        plugins=[CheckpointFiles()],
        log_every_n_steps=min(cfg.log_every_n_steps, cfg.max_steps) if cfg.max_steps > 0 else cfg.log_every_n_steps,
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=work_dir,
    )
    clash = sorted(set(cfg.extra) & set(managed))
    if clash:
        raise ValueError(f"trainer.extra.{clash[0]}: set by adamerge itself (use the trainer section's own field or leave it)")
    return L.Trainer(**managed, **to_plain(cfg.extra))


def _strategy(name: str):
    """DDP without re-broadcasting buffers every step: the task vectors are buffers, identical
    on every rank, and would otherwise be sent each step."""
    if name in ("ddp", "ddp_spawn"):
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(start_method="spawn" if name == "ddp_spawn" else "popen", broadcast_buffers=False)
    return name


def _instantiate(spec: DictConfig, key: str):
    """``{class_path, init_args}`` (as Lightning's CLI writes them) → an object; errors name the key."""
    spec = to_plain(spec)
    if not isinstance(spec, dict) or "class_path" not in spec or set(spec) - {"class_path", "init_args"}:
        raise ValueError(f"{key}: expected {{class_path: package.Class, init_args: {{...}}}}, got {spec!r}")
    module, _, name = spec["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"{key}: cannot import {spec['class_path']!r} ({error})") from error
    return cls(**spec.get("init_args", {}))
