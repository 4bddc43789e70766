"""The learners a fit recipe runs (adamerge.app.learners): chosen by the recipe's sections, each
writing its training log however short the run, progressive and CMA-ES runs resuming through the
runner; CMA-ES on validation accuracy beats task arithmetic on the digits zoo."""

from __future__ import annotations

import csv

import pytest
import torch

from adamerge.app import runner
from adamerge.app.config import load_recipe
from adamerge.app.learners import CoefficientFit, EvolutionFit, FrankWolfeFit, ProgressiveFit, learner_for
from adamerge.learning import evolution
from adamerge.learning.evaluation import average_accuracy
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
    assert isinstance(learner_for(load_recipe(recipe_dict(zoo, tmp_path, optimizer={"name": "cmaes"}, trainer=QUIET))),
                      EvolutionFit)


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


def test_a_streamed_fit_learns_what_the_in_memory_fit_learns_and_writes_the_model_shard_by_shard(causal_lm_zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    from adamerge.core.coefficients import MergeCoefficients
    from adamerge.io.checkpoints import open_weights

    problem = causal_lm_zoo

    def fit(name, stream):
        return runner.fit(load_recipe({
            "name": name, "output_dir": str(tmp_path / name), "problem": problem,
            "task_vectors": {"start": {"method": "wudi", "args": {"iterations": 5, "lr": 1.0e-3}}},
            "coefficients": {"granularity": "layer", "init": 0.0}, "objectives": [{"name": "expert_kl"}],
            "task_balance": "guarded", "optimizer": {"lr": 0.05},
            "trainer": {**QUIET, "batch_size": 2, "max_steps": 4, "stream": stream}, "evaluation": {"batch_size": 4},
        })).run_dir

    streamed, in_memory = fit("streamed", True), fit("in_memory", False)
    learned = MergeCoefficients.load(streamed / "coefficients.safetensors")().detach()
    reference = MergeCoefficients.load(in_memory / "coefficients.safetensors")().detach()
    assert not torch.equal(reference, MergeCoefficients.load(in_memory / "coefficients.safetensors").initial)
    torch.testing.assert_close(learned, reference, rtol=1e-4, atol=1e-5)
    reloaded = AutoModelForCausalLM.from_pretrained(streamed / "merged").state_dict()
    for key, tensor in open_weights(str(in_memory / "merged")).items():
        torch.testing.assert_close(reloaded[key], tensor, rtol=1e-4, atol=1e-5, msg=key)


def test_a_streamed_fit_refuses_what_it_cannot_stream(recipe_dict, zoo, tmp_path):
    from adamerge.app.config import RecipeError

    for trainer, coefficients, match in [
        ({"per_task_backward": True}, {}, "per_task_backward"),
        ({}, {"granularity": "element"}, "element-wise ones are as large"),
    ]:
        with pytest.raises(RecipeError, match=match):
            load_recipe(recipe_dict(zoo, tmp_path, trainer={**QUIET, "stream": True, **trainer},
                                    **({"coefficients": coefficients} if coefficients else {})))
    with pytest.raises(RecipeError, match="needs the whole model at once"):
        load_recipe(recipe_dict(zoo, tmp_path, trainer={**QUIET, "stream": True},
                                task_vectors={"start": {"method": "dare"}}))


# ---------------------------------------------------------------------- CMA-ES


@pytest.mark.parametrize("name", ["quickstart/cmaes", "text/cmaes"])
def test_the_built_in_cmaes_recipes_search_validation_accuracy(name):
    from adamerge.app.config import resolve_recipe

    recipe = load_recipe(resolve_recipe(name))
    assert isinstance(learner_for(recipe), EvolutionFit) and [o.name for o in recipe.objectives] == ["accuracy"]


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("digits"))


def digits_search(cache, out, name, generations=8, **sections):
    """CMA-ES over the digits zoo's task-wise coefficients on each task's validation accuracy."""
    return load_recipe({
        "name": name, "output_dir": f"{out}/{name}", "problem": {"kind": "digits", "cache_dir": cache},
        "coefficients": {"granularity": "task", "init": 0.3}, "objectives": [{"name": "accuracy"}],
        "optimizer": {"name": "cmaes", "args": {"popsize": 6, "sigma0": 0.2, "generations": generations}},
        "trainer": {"batch_size": 512, "threads": 1, "progress_bar": False, "accelerator": "cpu"},
        "export": {"merged_model": False, "plot": False}, **sections,
    })


def test_cmaes_on_validation_accuracy_beats_task_arithmetic_on_the_digits_zoo(digits_cache, tmp_path):
    searched = runner.fit(digits_search(digits_cache, tmp_path, "cmaes"))
    arithmetic = runner.merge(load_recipe({
        "name": "ta", "output_dir": f"{tmp_path}/ta", "problem": {"kind": "digits", "cache_dir": digits_cache},
        "method": {"name": "task_arithmetic", "args": {"scaling": 0.3}}, "export": {"merged_model": False},
    }))
    # on the held-out test rows, not the validation rows it searched on
    assert average_accuracy(searched.results) > average_accuracy(arithmetic.results) + 0.02
    logged = rows(searched.run_dir)
    assert [int(r["step"]) for r in logged] == list(range(8))
    assert all(float(r["train/loss"]) <= float(r["train/mean_loss"]) for r in logged)
    best = [float(r["train/best_loss"]) for r in logged]
    assert best == sorted(best, reverse=True) and best[-1] < best[0]
    summary = __import__("json").loads((searched.run_dir / "cmaes.json").read_text())
    assert summary["dimensions"] == 5 and summary["popsize"] == 6 and summary["best_score"] == best[-1]


def test_an_interrupted_cmaes_run_resumes_to_the_same_coefficients(digits_cache, tmp_path, crash):
    from safetensors.torch import load_file

    quiet = {"evaluation": {"enabled": False}}
    whole = runner.fit(digits_search(digits_cache, tmp_path, "whole", generations=5, **quiet)).run_dir
    crash.arm(evolution, "_save_scores", after=2)
    with pytest.raises(crash.error):
        runner.fit(digits_search(digits_cache, tmp_path, "cut", generations=5, **quiet))
    assert (tmp_path / "cut.partial" / "progress.safetensors").exists()
    crash.arm(evolution, "_save_scores")  # counting only
    resumed = runner.fit(digits_search(digits_cache, tmp_path, "cut", generations=5, **quiet)).run_dir
    assert crash.calls == 3  # generations 3 to 5 were scored; the first two replayed
    a, b = load_file(whole / "coefficients.safetensors"), load_file(resumed / "coefficients.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (whole / "metrics.csv").read_text() == (resumed / "metrics.csv").read_text()


def test_cmaes_scores_a_text_problems_validation_rows_and_names_a_task_without(recipe_dict, zoo, tmp_path):
    search = {"objectives": [{"name": "accuracy"}], "trainer": QUIET,
              "optimizer": {"name": "cmaes", "args": {"popsize": 4, "generations": 2}}}
    recipe = recipe_dict(zoo, tmp_path, name="text", **search)
    recipe["problem"]["tasks"]["a"]["validation"] = {"path": str(zoo / "data" / "a")}
    with pytest.raises(ValueError, match=r"^task 'b' has no validation rows \(problem\.tasks\.b\.validation\)"):
        runner.fit(load_recipe(recipe))
    recipe["problem"]["tasks"]["b"]["validation"] = {"path": str(zoo / "data" / "b")}
    run = runner.fit(load_recipe({**recipe, "overwrite": True})).run_dir
    assert [int(r["step"]) for r in rows(run)] == [0, 1] and (run / "coefficients.safetensors").is_file()
