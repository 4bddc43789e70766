"""The jobs a recipe describes, read top to bottom: ``fit`` (learn a merge with the recipe's
learner, :mod:`adamerge.app.learners`), ``merge`` (a data-free or data-driven method) and
``evaluate_run`` (re-evaluate a finished run). Each job resolves its device, validates, sets up
(one builder per recipe section, :mod:`adamerge.app.builders`), trains, then saves.

``fit`` trains in ``<output_dir>.partial`` (checkpoints and live logs) and resumes from
there when interrupted; only a complete run is renamed to ``<output_dir>``.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from adamerge.app.builders import build_data, build_merged, build_task_vectors, merge_scope
from adamerge.app.config import load_recipe, to_plain
from adamerge.app.export import write_coefficients, write_common
from adamerge.app.learners import learner_for
from adamerge.app.mergekit.write import write_method_mergekit
from adamerge.app.plots import training_curves
from adamerge.app.problems.problem import MergeProblem
from adamerge.app.problems import build_problem
from adamerge.app.rundir import changed_inputs, restore_log, resume_point, run_lock, write_inputs
from adamerge.core.merged import FunctionalModel, MergedModel
from adamerge.io.checkpoints import atomic_directory, record_inputs, write_text
from adamerge.learning.contract import LearnedMerge, log_csv
from adamerge.learning.data import CalibrationData
from adamerge.learning.evaluation import check_labels, evaluate
from adamerge.learning.placement import Placement, resolve_placement
from adamerge.methods import METHODS
from adamerge.methods.base import merging_on
from adamerge.methods.calibration import Calibration, needs_calibration


def setup_process(recipe: DictConfig) -> Placement:
    """The device every tensor of the job goes to (an accelerator the machine lacks is refused here,
    before any model loads); threads as the recipe asks; a console kept for adamerge's own progress
    (no hardware banners, no per-map bars)."""
    import datasets

    placement = resolve_placement(recipe.trainer)
    if recipe.trainer.threads:
        torch.set_num_threads(recipe.trainer.threads)

    datasets.disable_progress_bars()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*Experiment logs directory.*exists and is not empty.*")
    return placement


@dataclass
class RunResult:
    """What a job produced: where it is, the per-task evaluation and the merged model."""

    run_dir: Path
    results: dict[str, dict]
    merged: FunctionalModel  # a MergedModel, or for FW-Merging the backbone holding the merged weights
    seconds_to_merge: float | None = None  # from the job's start to the merged model (evaluation and export excluded)


def evaluate_problem(merged: FunctionalModel, problem: MergeProblem, data: CalibrationData, params=None,
                     trainer: L.Trainer | None = None, placement: Placement | None = None) -> dict:
    """Evaluate every task that has labelled evaluation data, on ``trainer`` (the run's: its loggers
    and processes) or on one device: ``placement``'s, where the weights are moved first."""
    names = [t for t in problem.tasks if t in problem.evaluation]
    if trainer is None and placement is not None:
        if isinstance(params, Mapping):
            params = {k: v.to(placement.device, non_blocking=True) for k, v in params.items()}
        elif params is None:
            merged.to(placement.device)
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
    """Learn a merge with the learner the recipe describes (:mod:`adamerge.app.learners`), evaluate
    it, and export a run directory: one path and one save block for every learner."""
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    if recipe.method is not None:
        raise ValueError("this recipe describes a data-free merge ('method'); run it with `adamerge merge`")
    learner = learner_for(recipe)
    run_dir, work_dir = _prepare_output(recipe)
    placement = setup_process(recipe)
    L.seed_everything(recipe.seed, verbose=False)
    started = time.perf_counter()
    with run_lock(work_dir):
        resume = resume_point(recipe, work_dir)
        inputs = record_inputs()
        problem = build_problem(recipe.problem, streamed=learner.streamed(recipe))
        data = build_data(recipe, problem)
        check_labels(FunctionalModel(problem.pretrained), problem.tasks, data)
        learned = learner.learn(recipe, problem, data, placement, work_dir, resume)
        seconds = time.perf_counter() - started
        results = {}
        if recipe.evaluation.enabled:  # every process evaluates its share of the rows, through the run's loggers
            results = evaluate_problem(learned.model, problem, data, params=learned.params, trainer=learned.trainer,
                                       placement=placement)
        if learned.trainer is not None and learned.trainer.global_rank != 0:  # only the first process writes the run
            return RunResult(run_dir, results, learned.model)
        _save_fit(recipe, run_dir, work_dir, problem, inputs, learned, results)
    return RunResult(run_dir, results, learned.model, seconds)


def _save_fit(recipe: DictConfig, run_dir: Path, work_dir: Path, problem: MergeProblem, inputs, learned: LearnedMerge,
              results: dict) -> None:
    """The run directory of every learner: coefficients (when it learns some), inputs, its own files,
    the merged model and card, and the training log with its plot; then the work directory goes."""
    restore_log(work_dir)
    with atomic_directory(run_dir, recipe.overwrite) as staging:
        if learned.coefficients is not None:
            write_coefficients(staging, learned.coefficients, recipe, problem)
        write_inputs(staging, inputs, problem.description)
        for name, text in learned.files.items():
            write_text(staging / name, text)
        write_common(staging, recipe, problem, learned.export, learned.how, results, learned.coefficients)
        _keep_training_log(recipe, learned, staging)
    shutil.rmtree(work_dir, ignore_errors=True)


def _keep_training_log(recipe: DictConfig, learned: LearnedMerge, staging: Path) -> None:
    """``metrics.csv`` (the objective over training, per task where the learner logs it) and its plot."""
    lightning_log = learned.log_dir / "metrics.csv" if learned.log_dir is not None else None
    if lightning_log is not None and lightning_log.exists():
        shutil.copy(lightning_log, staging / "metrics.csv")
    elif learned.log:
        write_text(staging / "metrics.csv", log_csv(learned.log))
    else:
        return
    if recipe.export.plot:
        training_curves(staging / "metrics.csv", staging / "training.png")


def merge(recipe: DictConfig | str) -> RunResult:
    """Run a merge method (data-free, or data-driven on the calibration inputs), evaluate it, and
    export a run directory."""
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    if recipe.method is None:
        raise ValueError("this recipe has no 'method' section; learn coefficients with `adamerge fit`")
    run_dir, _ = _prepare_output(recipe)
    placement = setup_process(recipe)
    inputs = record_inputs()
    problem = build_problem(recipe.problem)
    module, merged, results = _merge_and_evaluate(recipe, problem, placement)
    kind = "data-driven" if needs_calibration(METHODS.get(recipe.method.name)) else "data-free"
    how = f"{kind} `{recipe.method.name}` {to_plain(recipe.method.args)}"
    with atomic_directory(run_dir, recipe.overwrite) as staging:
        write_common(staging, recipe, problem, module, how, results)
        write_inputs(staging, inputs, problem.description)
        if recipe.export.mergekit:
            write_method_mergekit(staging, recipe, problem, merge_scope(recipe, problem))
    return RunResult(run_dir, results, merged)


def _merge_and_evaluate(recipe: DictConfig, problem: MergeProblem, placement: Placement):
    method, extra = METHODS.get(recipe.method.name), {}
    if needs_calibration(method):  # a data-driven method runs each expert on its own task's calibration batches
        data = build_data(recipe, problem)
        batches = {task: partial(data.calibration_batches, task, recipe.trainer.batch_size) for task in data.calibration}
        extra["calibration"] = Calibration(problem.pretrained, problem.tasks, batches, placement.device)
    with merging_on(placement.device):
        module = method(problem.pretrained, problem.experts, **merge_scope(recipe, problem), **extra,
                        **to_plain(recipe.method.args))
    model = FunctionalModel(problem.pretrained)
    results = {}
    if recipe.evaluation.enabled and problem.evaluation:
        results = evaluate_problem(model, problem, build_data(recipe, problem), params=module.state_dict(), placement=placement)
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
    placement = setup_process(recipe)
    problem = build_problem(recipe.problem)
    if recipe.method is not None:
        return _merge_and_evaluate(recipe, problem, placement)[2]
    merged = build_merged(recipe, problem, build_task_vectors(recipe, problem))
    merged.load_coefficients(str(run_dir / "coefficients.safetensors"))
    return evaluate_problem(merged, problem, build_data(recipe, problem), placement=placement)
