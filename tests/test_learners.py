"""The learners a fit recipe runs (adamerge.app.learners): chosen by the recipe's sections, each
writing its training log however short the run, progressive runs resuming through the runner."""

from __future__ import annotations

import csv

import pytest
import torch

from adamerge.app import runner
from adamerge.app.config import load_recipe
from adamerge.app.learners import CoefficientFit, FrankWolfeFit, ProgressiveFit, learner_for
from adamerge.learning.progressive import ProgressiveDistiller

QUIET = {"batch_size": 4, "progress_bar": False, "accelerator": "cpu"}


def progressive(recipe_dict, zoo, tmp_path, name):
    return load_recipe(recipe_dict(zoo, tmp_path, name=name, objectives=[], trainer=QUIET,
                                   progressive={"epochs": 2, "samples_per_task": 8}))


def test_the_recipe_sections_choose_the_learner(recipe_dict, zoo, tmp_path):
    assert isinstance(learner_for(load_recipe(recipe_dict(zoo, tmp_path))), CoefficientFit)
    assert isinstance(learner_for(progressive(recipe_dict, zoo, tmp_path, "p")), ProgressiveFit)
    fw = load_recipe(recipe_dict(zoo, tmp_path, trainer=QUIET, frank_wolfe={"iterations": 1}))
    assert isinstance(learner_for(fw), FrankWolfeFit)


def rows(run_dir):
    return list(csv.DictReader(open(run_dir / "metrics.csv")))


def test_a_fit_shorter_than_the_logging_interval_still_writes_its_log(recipe_dict, zoo, tmp_path):
    trainer = {**QUIET, "max_steps": 3, "log_every_n_steps": 10, "checkpoint_every_n_steps": 10}
    run = runner.fit(load_recipe(recipe_dict(zoo, tmp_path, name="short", trainer=trainer))).run_dir
    logged = [r for r in rows(run) if r.get("train/loss")]
    assert [int(r["step"]) for r in logged] == [2]  # Lightning's 0-based step of the third update


def test_progressive_and_fw_runs_write_their_logs_and_plots(recipe_dict, zoo, tmp_path):
    run = runner.fit(progressive(recipe_dict, zoo, tmp_path, "pd")).run_dir
    logged = rows(run)
    assert len(logged) > 2 and all(float(r["train/loss"]) >= 0 for r in logged)
    assert [int(r["step"]) for r in logged] == sorted(int(r["step"]) for r in logged)
    assert (run / "training.png").exists()
    fw = load_recipe(recipe_dict(zoo, tmp_path, name="fw", trainer=QUIET, frank_wolfe={"iterations": 2}))
    fw_rows = rows(runner.fit(fw).run_dir)
    assert [int(r["step"]) for r in fw_rows] == [0, 1]


def test_an_interrupted_progressive_run_resumes_after_its_last_block(recipe_dict, zoo, tmp_path, crash):
    whole = runner.fit(progressive(recipe_dict, zoo, tmp_path, "whole")).run_dir
    crash.arm(ProgressiveDistiller, "_save_checkpoint", after=2)
    with pytest.raises(crash.error):
        runner.fit(progressive(recipe_dict, zoo, tmp_path, "cut"))
    assert (tmp_path / "cut.partial" / "progress.safetensors").exists()
    crash.arm(ProgressiveDistiller, "_save_checkpoint")  # counting only
    resumed = runner.fit(progressive(recipe_dict, zoo, tmp_path, "cut")).run_dir
    stages = len(__import__("json").loads((whole / "progressive.json").read_text()))
    assert crash.calls == stages - 2  # the two finished blocks were not trained again
    from safetensors.torch import load_file

    a, b = load_file(whole / "coefficients.safetensors"), load_file(resumed / "coefficients.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_batches_built_by_worker_threads_learn_the_same_coefficients(recipe_dict, zoo, tmp_path):
    from safetensors.torch import load_file

    runs = [runner.fit(load_recipe(recipe_dict(zoo, tmp_path, name=f"w{workers}", trainer={**QUIET, "max_steps": 4,
                                                                                           "data_workers": workers})))
            for workers in (0, 2)]
    a, b = (load_file(run.run_dir / "coefficients.safetensors") for run in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_learner_declares_the_trainer_fields_the_recipe_check_holds_it_to():
    from adamerge.app.checks import HONOURED_TRAINER_FIELDS
    from adamerge.app.learners import LEARNERS

    assert set(LEARNERS) == set(HONOURED_TRAINER_FIELDS)
    assert all(LEARNERS.get(name).trainer_fields == fields for name, fields in HONOURED_TRAINER_FIELDS.items())
