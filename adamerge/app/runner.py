"""The jobs a recipe describes, read top to bottom: ``fit`` (learn coefficients), ``merge``
(a data-free method) and ``evaluate_run`` (re-evaluate a finished run). Each job validates,
sets up (one builder per recipe section, :mod:`adamerge.app.builders`), trains, then saves.

``fit`` trains in ``<output_dir>.partial`` (checkpoints and live logs) and resumes from
there when interrupted; only a complete run is renamed to ``<output_dir>``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from adamerge.app.builders import (
    build_coefficients,
    build_data,
    build_learner,
    build_merged,
    build_objectives,
    build_selection,
    build_task_vectors,
    build_trainer,
    merge_scope,
    progressive_batches,
    task_weights,
)
from adamerge.app.config import load_recipe, to_plain
from adamerge.app.export import write_coefficients, write_common
from adamerge.app.mergekit.write import write_method_mergekit
from adamerge.app.plots import training_curves
from adamerge.app.problem import MergeProblem
from adamerge.app.problems import build_problem
from adamerge.app.rundir import changed_inputs, restore_log, resume_point, run_lock, write_inputs
from adamerge.core.merged import FunctionalModel, MergedModel, module_with_tensors
from adamerge.io.checkpoints import atomic_directory, open_weights, record_inputs, write_text
from adamerge.io.shards import ShardWriter
from adamerge.learning.data import CalibrationData
from adamerge.learning.evaluate import check_labels, evaluate
from adamerge.learning.frank_wolfe import frank_wolfe_merge
from adamerge.learning.learner import frozen_modules_expected
from adamerge.learning.progressive import ProgressiveDistiller
from adamerge.methods import METHODS
from adamerge.tasks.blocks import stage_count


def setup_process(recipe: DictConfig) -> None:
    """Threads as the recipe asks; a console kept for adamerge's own progress (no hardware
    banners, no per-map bars)."""
    import datasets

    if recipe.trainer.threads:
        torch.set_num_threads(recipe.trainer.threads)

    datasets.disable_progress_bars()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*Experiment logs directory.*exists and is not empty.*")


@dataclass
class RunResult:
    """What a job produced: where it is, the per-task evaluation and the merged model."""

    run_dir: Path
    results: dict[str, dict]
    merged: FunctionalModel  # a MergedModel, or for FW-Merging the backbone holding the merged weights
    seconds_to_merge: float | None = None  # from the job's start to the merged model (evaluation and export excluded)


def evaluate_problem(merged: FunctionalModel, problem: MergeProblem, data: CalibrationData, params=None,
                     trainer: L.Trainer | None = None) -> dict:
    """Evaluate every task that has labelled evaluation data, on ``trainer`` (the run's: its loggers
    and processes) or on one device."""
    names = [t for t in problem.tasks if t in problem.evaluation]
    return evaluate(merged, problem.tasks, data, params=params, names=names, trainer=trainer)


def evaluate_baselines(merged: MergedModel, problem: MergeProblem, data: CalibrationData) -> dict[str, dict]:
    """Each expert on its own task, and the pretrained model with each task's head."""
    results = {"pretrained": evaluate_problem(merged, problem, data, params=merged.pretrained_parameters())}
    if all(t in merged.expert_names for t in problem.tasks if t in problem.evaluation):
        results = {"experts": evaluate_problem(merged, problem, data, params=merged.expert_parameters), **results}
    return results


def _prepare_output(recipe: DictConfig) -> tuple[Path, Path]:
    run_dir = Path(recipe.output_dir).expanduser()
    if run_dir.exists() and not recipe.overwrite:
        raise FileExistsError(f"{run_dir} already holds a finished run; set overwrite=true or choose another output_dir")
    return run_dir, run_dir.with_name(run_dir.name + ".partial")


# ---------------------------------------------------------------------- jobs


def fit(recipe: DictConfig | str) -> RunResult:
    """Learn merge coefficients (or run FW-Merging, with a ``frank_wolfe`` section) as the recipe says,
    evaluate, and export a run directory."""
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    if recipe.method is not None:
        raise ValueError("this recipe describes a data-free merge ('method'); run it with `adamerge merge`")
    run_dir, work_dir = _prepare_output(recipe)
    setup_process(recipe)
    L.seed_everything(recipe.seed, verbose=False)
    started = time.perf_counter()
    with run_lock(work_dir):
        if recipe.frank_wolfe is not None:
            return _fit_frank_wolfe(recipe, run_dir, work_dir, started)
        if recipe.progressive is not None:
            return _fit_progressive(recipe, run_dir, work_dir, started)
        return _learn_coefficients(recipe, run_dir, work_dir, started)


def _learn_coefficients(recipe: DictConfig, run_dir: Path, work_dir: Path, started: float) -> RunResult:
    """Train in ``work_dir`` (held by this run), resuming its checkpoint if this recipe was interrupted there."""
    resume = resume_point(recipe, work_dir)
    inputs = record_inputs()
    problem = build_problem(recipe.problem)
    merged = build_merged(recipe, problem, build_task_vectors(recipe, problem))
    data = build_data(recipe, problem)
    check_labels(merged, problem.tasks, data)
    learner, selection, trainer = build_learner(recipe, problem, merged), build_selection(recipe), build_trainer(recipe, work_dir)
    if selection is not None:
        trainer.callbacks.insert(0, selection)  # before the checkpoint callback: a checkpoint holds its latest check
    if resume is not None:
        print(f"resuming the interrupted run from {resume}")
    with frozen_modules_expected():
        trainer.fit(learner, datamodule=data, ckpt_path=resume)
    seconds = time.perf_counter() - started
    # every process evaluates its share of the rows (and logs through the run's loggers) ...
    results = evaluate_problem(merged, problem, data, trainer=trainer) if recipe.evaluation.enabled else {}
    if trainer.global_rank != 0:  # ... and only the first writes the run
        return RunResult(run_dir, results, merged)
    restore_log(work_dir)
    how = f"{merged.layout.granularity}-wise coefficients learned with {[o.name for o in recipe.objectives]}"
    with atomic_directory(run_dir, recipe.overwrite) as staging:
        write_coefficients(staging, merged.coefficients, recipe, problem)
        write_inputs(staging, inputs, problem.description)
        if selection is not None:
            chosen = {"step": selection.best["step"], "criterion": selection.best["value"]}
            write_text(staging / "selection.json", json.dumps(chosen, indent=1))
        write_common(staging, recipe, problem, merged.to_module(), how, results, merged.coefficients)
        _keep_training_log(recipe, work_dir, staging)
    shutil.rmtree(work_dir, ignore_errors=True)
    return RunResult(run_dir, results, merged, seconds)


def _keep_training_log(recipe: DictConfig, work_dir: Path, staging: Path) -> None:
    """``metrics.csv`` (the objective per task over training) and its plot into the run directory."""
    if (work_dir / "metrics.csv").exists():
        shutil.copy(work_dir / "metrics.csv", staging / "metrics.csv")
        if recipe.export.plot:
            training_curves(staging / "metrics.csv", staging / "training.png")


def _fit_progressive(recipe: DictConfig, run_dir: Path, work_dir: Path, started: float) -> RunResult:
    """ProDistill: coefficients learned block by block, resumable after every finished block;
    streamed (``progressive.stream``), the model is read and written one block at a time."""
    resume_point(recipe, work_dir)
    inputs = record_inputs()
    stream = recipe.progressive.stream
    problem = build_problem(recipe.problem, streamed=stream)
    coefficients, keys = build_coefficients(recipe, problem)
    data = build_data(recipe, problem)
    model = FunctionalModel(problem.pretrained)
    check_labels(model, problem.tasks, data)
    shards = work_dir / "merged"
    distiller = ProgressiveDistiller(
        problem.pretrained, problem.experts, problem.tasks, progressive_batches(recipe, problem, data), coefficients,
        keys=keys, dtype=recipe.task_vectors.dtype, low_rank=recipe.task_vectors.low_rank, epochs=recipe.progressive.epochs,
        lr=recipe.optimizer.lr, optimizer=recipe.optimizer.name, weight_decay=recipe.optimizer.weight_decay,
        task_weights=task_weights(recipe), seed=recipe.seed,
        checkpoint=work_dir / "progress.safetensors", progress=recipe.trainer.progress_bar,
        weights=problem.pretrained_weights if stream else None,
        writer=ShardWriter(shards, stage_count(problem.pretrained)) if stream else None,
        features_dir=work_dir / "features" if recipe.progressive.features == "disk" else None,
    )
    result = distiller.run()
    merged = result.merged
    if stream:
        distiller.writer.finish()
        merged = dict(open_weights(str(shards)))  # evaluation holds the merged model whole; export does not
    seconds = time.perf_counter() - started
    results = evaluate_problem(model, problem, data, params=merged) if recipe.evaluation.enabled else {}
    del merged
    how = f"{coefficients.layout.granularity}-wise coefficients learned block by block (progressive layer-wise distillation{', streamed' if stream else ''})"
    with atomic_directory(run_dir, recipe.overwrite) as staging:
        write_coefficients(staging, coefficients, recipe, problem)
        write_inputs(staging, inputs, problem.description)
        write_text(staging / "progressive.json", json.dumps(result.history, indent=1))
        module = shards if stream else module_with_tensors(problem.pretrained, result.merged)
        write_common(staging, recipe, problem, module, how, results, coefficients)
    shutil.rmtree(work_dir, ignore_errors=True)
    return RunResult(run_dir, results, model, seconds)


def _fit_frank_wolfe(recipe: DictConfig, run_dir: Path, work_dir: Path, started: float) -> RunResult:
    """FW-Merging: walk the merged weights toward the best experts; the run keeps its history, not coefficients.
    It holds the run directory's lock like every fit, but has no checkpoints: an interrupted run starts over."""
    inputs = record_inputs()
    problem = build_problem(recipe.problem)
    data = build_data(recipe, problem)
    device = "cuda" if recipe.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu"
    result = frank_wolfe_merge(
        problem.pretrained, problem.experts, problem.tasks, data, build_objectives(recipe),
        **to_plain(recipe.frank_wolfe), **merge_scope(recipe, problem),
        task_weights=task_weights(recipe), task_balance=recipe.task_balance, guard_weight=recipe.guard_weight,
        device=device,
    )
    seconds = time.perf_counter() - started
    results = {}
    if recipe.evaluation.enabled:
        results = evaluate_problem(result.model, problem, data, params=result.merged_parameters())
    cfg = recipe.frank_wolfe
    how = f"FW-Merging ({cfg.mode}, {cfg.lmo}-wise LMO, {cfg.iterations} iterations) with {[o.name for o in recipe.objectives]}"
    with atomic_directory(run_dir, recipe.overwrite) as staging:
        write_text(staging / "fw_history.json", json.dumps(result.history, indent=1))
        write_inputs(staging, inputs, problem.description)
        write_common(staging, recipe, problem, result.model.backbone, how, results)
    shutil.rmtree(work_dir, ignore_errors=True)
    return RunResult(run_dir, results, result.model, seconds)


def merge(recipe: DictConfig | str) -> RunResult:
    """Run a data-free merge method, evaluate it, and export a run directory."""
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    if recipe.method is None:
        raise ValueError("this recipe has no 'method' section; learn coefficients with `adamerge fit`")
    run_dir, _ = _prepare_output(recipe)
    setup_process(recipe)
    inputs = record_inputs()
    problem = build_problem(recipe.problem)
    module, merged, results = _merge_and_evaluate(recipe, problem)
    how = f"data-free `{recipe.method.name}` {to_plain(recipe.method.args)}"
    with atomic_directory(run_dir, recipe.overwrite) as staging:
        write_common(staging, recipe, problem, module, how, results)
        write_inputs(staging, inputs, problem.description)
        if recipe.export.mergekit:
            write_method_mergekit(staging, recipe, problem, merge_scope(recipe, problem))
    return RunResult(run_dir, results, merged)


def _merge_and_evaluate(recipe: DictConfig, problem: MergeProblem):
    method = METHODS.get(recipe.method.name)
    module = method(problem.pretrained, problem.experts, **merge_scope(recipe, problem), **to_plain(recipe.method.args))
    model = FunctionalModel(problem.pretrained)
    results = {}
    if recipe.evaluation.enabled and problem.evaluation:
        results = evaluate_problem(model, problem, build_data(recipe, problem), params=module.state_dict())
    elif recipe.evaluation.enabled:
        print("no task has evaluation data: the merge is exported without evaluation")
    return module, model, results


def evaluate_run(run_dir: str | Path) -> dict[str, dict]:
    """Re-evaluate a finished run from its recipe and coefficients."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a finished adamerge run (no recipe.yaml)")
    recipe = load_recipe(run_dir / "recipe.yaml")
    for change in changed_inputs(run_dir):
        warnings.warn(f"{run_dir}: {change}; the results may differ from the run's", stacklevel=2)
    if recipe.frank_wolfe is not None:
        raise ValueError(f"{run_dir} is an FW-Merging run: it has no coefficients to re-evaluate; run `adamerge fit` again")
    setup_process(recipe)
    problem = build_problem(recipe.problem)
    if recipe.method is not None:
        return _merge_and_evaluate(recipe, problem)[2]
    merged = build_merged(recipe, problem, build_task_vectors(recipe, problem))
    merged.load_coefficients(str(run_dir / "coefficients.safetensors"))
    return evaluate_problem(merged, problem, build_data(recipe, problem))
