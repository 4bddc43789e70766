"""The learners a recipe can name, each under the one learning contract (:mod:`adamerge.learning.contract`).

Which learner runs follows from the recipe's sections: ``frank_wolfe`` → FW-Merging,
``progressive`` → progressive (and streamed) distillation, ``optimizer.name: cmaes`` → CMA-ES,
otherwise the Lightning coefficient learner. Each builds its parts with
:mod:`adamerge.app.builders`, works on the resolved device, and returns a
:class:`~adamerge.learning.contract.LearnedMerge` that the runner evaluates and saves in one place.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning.fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig

from adamerge.app.builders import (
    build_coefficients,
    build_learner,
    build_merged,
    build_objectives,
    build_selection,
    build_streamed_merged,
    build_task_vectors,
    build_trainer,
    merge_scope,
    progressive_batches,
    stage_start,
    task_weights,
)
from adamerge.app.checks import HONOURED_TRAINER_FIELDS, learner_name
from adamerge.app.config import to_plain
from adamerge.app.rundir import PROGRESS
from adamerge.core.merged import FunctionalModel, module_with_tensors
from adamerge.core.registry import Registry
from adamerge.io.checkpoints import open_weights
from adamerge.io.shards import ShardWriter
from adamerge.learning.contract import LearnedMerge, Learner
from adamerge.learning.data import ordered_batches
from adamerge.learning.evolution import Scorer, cmaes_options, cmaes_search
from adamerge.learning.frank_wolfe import frank_wolfe_merge
from adamerge.learning.learner import frozen_modules_expected
from adamerge.learning.loss import TaskLoss
from adamerge.learning.placement import Placement
from adamerge.learning.progressive import ProgressiveDistiller
from adamerge.objectives import ObjectiveContext, WeightedObjectives
from adamerge.tasks.blocks import stage_count

LEARNERS: Registry[type] = Registry("learner")


@LEARNERS.register("coefficients")
class CoefficientFit:
    """Coefficients trained by Lightning on the recipe's objectives (AdaMerging, Expert Merging, ...):
    every ``trainer`` field is Lightning's, so every one is honoured (DDP, precision, loggers, ...)."""

    name = "coefficients"
    trainer_fields = HONOURED_TRAINER_FIELDS["coefficients"]

    def streamed(self, recipe: DictConfig) -> bool:
        return bool(recipe.trainer.stream)

    def learn(self, recipe: DictConfig, problem, data, placement: Placement, work_dir: Path, resume: Path | None) -> LearnedMerge:
        stream = self.streamed(recipe)
        if stream:
            merged = build_streamed_merged(recipe, problem, placement.device, work_dir)
        else:
            merged = build_merged(recipe, problem, build_task_vectors(recipe, problem))
        learner = build_learner(recipe, problem, merged)
        selection, trainer = build_selection(recipe, learner.objective), build_trainer(recipe, work_dir)
        if selection is not None:
            trainer.callbacks.insert(0, selection)  # before the checkpoint callback: a checkpoint holds its latest check
        if resume is not None:
            print(f"resuming the interrupted run from {resume}")
        with frozen_modules_expected():
            trainer.fit(learner, datamodule=data, ckpt_path=resume)
        files = {}
        if selection is not None:
            files["selection.json"] = json.dumps({"step": selection.best["step"], "criterion": selection.best["value"]}, indent=1)
        how = f"{merged.layout.granularity}-wise coefficients learned with {[o.name for o in recipe.objectives]}"
        if not stream:
            return LearnedMerge(model=merged, export=merged.to_module(), how=how, coefficients=merged.coefficients,
                                files=files, log_dir=work_dir, trainer=trainer)
        shards = merged.write_merged(work_dir / "merged")  # evaluation holds the merged model whole; export reads the shards
        params = {k: v.to(placement.device) for k, v in open_weights(str(shards)).items()} if recipe.evaluation.enabled else None
        return LearnedMerge(model=FunctionalModel(problem.pretrained), export=shards, how=how + ", streamed block by block",
                            params=params, coefficients=merged.coefficients, files=files, log_dir=work_dir, trainer=trainer)


@LEARNERS.register("progressive")
class ProgressiveFit:
    """ProDistill block by block (:mod:`adamerge.learning.progressive`), resumable after every block;
    streamed (``progressive.stream``), the model is read and written one block at a time. It trains
    for ``progressive.epochs`` per block on one device in float32, on the MSE to each expert's features."""

    name = "progressive"
    trainer_fields = HONOURED_TRAINER_FIELDS["progressive"]

    def streamed(self, recipe: DictConfig) -> bool:
        return bool(recipe.progressive.stream)

    def learn(self, recipe: DictConfig, problem, data, placement: Placement, work_dir: Path, resume: Path | None) -> LearnedMerge:
        stream = self.streamed(recipe)
        coefficients, keys = build_coefficients(recipe, problem)
        shards = work_dir / "merged"
        distiller = ProgressiveDistiller(
            problem.pretrained, problem.experts, problem.tasks, progressive_batches(recipe, problem, data), coefficients,
            keys=keys, dtype=recipe.task_vectors.dtype, low_rank=recipe.task_vectors.low_rank, epochs=recipe.progressive.epochs,
            lr=recipe.optimizer.lr, optimizer=recipe.optimizer.name, weight_decay=recipe.optimizer.weight_decay,
            task_weights=task_weights(recipe), seed=recipe.seed,
            checkpoint=work_dir / PROGRESS, progress=recipe.trainer.progress_bar,
            weights=problem.pretrained_weights if stream else None,
            writer=ShardWriter(shards, stage_count(problem.pretrained)) if stream else None,
            features_dir=work_dir / "features" if recipe.progressive.features == "disk" else None,
            device=placement.device, stage_vectors=stage_start(recipe, problem),
        )
        result = distiller.run()
        model = FunctionalModel(problem.pretrained)
        if stream:
            distiller.writer.finish()
            # evaluation holds the merged model whole on the device; export reads the shards
            params = {k: v.to(placement.device) for k, v in open_weights(str(shards)).items()}
            export = shards
        else:
            params = result.merged
            export = module_with_tensors(problem.pretrained, result.merged)
        how = ("{}-wise coefficients learned block by block (progressive layer-wise distillation{})"
               .format(coefficients.layout.granularity, ", streamed" if stream else ""))
        return LearnedMerge(model=model, export=export, how=how, params=params, coefficients=coefficients,
                            files={"progressive.json": json.dumps(result.history, indent=1)}, log=distiller.log)


@LEARNERS.register("frank_wolfe")
class FrankWolfeFit:
    """FW-Merging: walk the merged weights toward the best experts (:mod:`adamerge.learning.frank_wolfe`);
    the run keeps its history, not coefficients. It has no checkpoints: an interrupted run starts over."""

    name = "frank_wolfe"
    trainer_fields = HONOURED_TRAINER_FIELDS["frank_wolfe"]

    def streamed(self, recipe: DictConfig) -> bool:
        return False

    def learn(self, recipe: DictConfig, problem, data, placement: Placement, work_dir: Path, resume: Path | None) -> LearnedMerge:
        result = frank_wolfe_merge(
            problem.pretrained, problem.experts, problem.tasks, data, build_objectives(recipe),
            **to_plain(recipe.frank_wolfe), **merge_scope(recipe, problem),
            task_weights=task_weights(recipe), task_balance=recipe.task_balance, guard_weight=recipe.guard_weight,
            device=placement.device,
        )
        cfg = recipe.frank_wolfe
        how = f"FW-Merging ({cfg.mode}, {cfg.lmo}-wise LMO, {cfg.iterations} iterations) with {[o.name for o in recipe.objectives]}"
        log = [{"step": h["iteration"], "train/loss": h["objective_after"]} for h in result.history]
        return LearnedMerge(model=result.model, export=result.model.backbone, how=how, params=result.merged_parameters(),
                            files={"fw_history.json": json.dumps(result.history, indent=1)}, log=log)


@LEARNERS.register("cmaes")
class EvolutionFit:
    """CMA-ES over the coefficients (:mod:`adamerge.learning.evolution`), a derivative-free search
    scored by the recipe's objective on each task's calibration rows, or for ``accuracy`` on its
    validation rows; it checkpoints after every generation and resumes exactly."""

    name = "cmaes"
    trainer_fields = HONOURED_TRAINER_FIELDS["cmaes"]

    def streamed(self, recipe: DictConfig) -> bool:
        return False

    def learn(self, recipe: DictConfig, problem, data, placement: Placement, work_dir: Path, resume: Path | None) -> LearnedMerge:
        options = cmaes_options(to_plain(recipe.optimizer.args))
        merged = build_merged(recipe, problem, build_task_vectors(recipe, problem)).to(placement.device)
        tasks = {name: task.to(placement.device).eval() for name, task in problem.tasks.items()}
        objective = build_objectives(recipe).to(placement.device)
        rows = "validation" if _scores_validation(objective) else "calibration"
        if rows == "calibration":
            _set_up(objective, merged, tasks, data, placement.device)
        batches = {name: list(_scoring_batches(name, problem, data, rows, recipe.trainer.batch_size)) for name in tasks}
        loss = TaskLoss(tasks, objective, task_weights(recipe), recipe.task_balance, recipe.guard_weight)
        score = Scorer(merged, loss, batches, placement.device)
        result = cmaes_search(merged.coefficients, score, options, seed=recipe.seed, checkpoint=work_dir / PROGRESS,
                              progress=recipe.trainer.progress_bar)
        how = (f"{merged.layout.granularity}-wise coefficients searched by CMA-ES ({len(result.log)} generations of "
               f"{result.popsize}) on {[o.name for o in recipe.objectives]} over the {rows} rows")
        return LearnedMerge(model=merged, export=merged.to_module(), how=how, coefficients=merged.coefficients,
                            files={"cmaes.json": json.dumps(result.summary(), indent=1)}, log=result.log)


def _set_up(objective, merged, tasks, data, device) -> None:
    """An objective that precomputes targets (alignment) reads every calibration row once, on the device."""

    def batches(task: str):
        return (move_data_to_device(b, device) for b in data.calibration_batches(task))

    objective.setup(ObjectiveContext(merged, tasks, batches, device))


def _scores_validation(objective) -> bool:
    parts = list(objective.parts) if isinstance(objective, WeightedObjectives) else [objective]
    scored = [part.scores_validation for part in parts]
    if any(scored) and len(parts) > 1:
        raise ValueError("objectives: accuracy scores each task's validation rows; list it alone")
    return any(scored)


def _scoring_batches(task: str, problem, data, rows: str, batch_size: int):
    """A task's calibration rows, or its validation rows (refused, naming the task, when it has none), in order."""
    if rows == "calibration":
        return data.calibration_batches(task, batch_size)
    if task not in problem.validation:
        raise ValueError(f"task {task!r} has no validation rows (problem.tasks.{task}.validation): objective "
                         "accuracy scores each task's labelled validation rows")
    return ordered_batches(task, problem.validation[task], batch_size, data.collate_for(task))


def learner_for(recipe: DictConfig) -> Learner:
    """The learner a ``fit`` recipe describes (the recipe's load refused what it would not honour)."""
    return LEARNERS.get(learner_name(recipe))()
