"""Recipe sections to objects (adamerge.app.builders): the trainer, with Lightning's own surface from
a recipe (extra loggers and callbacks by class path, any other Trainer argument; clashes with what
adamerge manages and bad class paths named; a progress bar counting steps), and progressive
learning from a data-free start."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from adamerge.app import learners, runner
from adamerge.app.builders import build_merged, build_task_vectors
from adamerge.app.config import RecipeError, load_recipe
from adamerge.app.problems import build_problem
from adamerge.io.checkpoints import open_weights

QUIET = {"batch_size": 4, "progress_bar": False, "accelerator": "cpu"}
STARTS = [("wudi", {"iterations": 3}), ("tsv", {}), ("ties", {"trim_scope": "tensor", "density": 0.5}), ("iso_c", {})]


def start_merge(recipe_dict, zoo, tmp_path, start) -> dict[str, torch.Tensor]:
    """The all-at-once path's merge at its initial coefficients: the start method's merge exactly."""
    recipe = load_recipe(recipe_dict(zoo, tmp_path, name="whole", task_vectors={"start": start},
                                     coefficients={"granularity": "layer", "init": 0.0}))
    problem = build_problem(recipe.problem)
    merged = build_merged(recipe, problem, build_task_vectors(recipe, problem))
    return {k.removeprefix("bert."): v for k, v in merged.merged_parameters().items()}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("method, args", STARTS)
def test_progressive_learning_from_a_start_begins_exactly_at_that_merge(recipe_dict, zoo, tmp_path, method, args, stream):
    start = {"method": method, "args": args}
    recipe = load_recipe(recipe_dict(
        zoo, tmp_path, name="from_start", objectives=[], trainer=QUIET, task_vectors={"start": start},
        coefficients={"granularity": "layer", "init": 0.0}, progressive={"epochs": 0, "samples_per_task": 4, "stream": stream},
    ))
    run = runner.fit(recipe).run_dir
    written = dict(open_weights(str(run / "merged")))
    expected = start_merge(recipe_dict, zoo, tmp_path, start)
    assert set(expected) <= set(written)
    for key, tensor in expected.items():
        torch.testing.assert_close(written[key], tensor, rtol=1e-6, atol=1e-6, msg=key)
    assert "start" in (run / "coefficients.json").read_text()


def test_progressive_learning_from_a_start_learns_corrections_on_top(recipe_dict, zoo, tmp_path):
    start = {"method": "tsv", "args": {}}
    recipe = load_recipe(recipe_dict(
        zoo, tmp_path, name="learned", objectives=[], trainer=QUIET, task_vectors={"start": start}, optimizer={"lr": 0.05},
        coefficients={"granularity": "layer", "init": 0.0}, progressive={"epochs": 3, "samples_per_task": 8},
    ))
    history = runner.fit(recipe)
    import json

    stages = json.loads((history.run_dir / "progressive.json").read_text())
    trained = [s for s in stages if s["steps"]]
    assert trained and all(s["last_epoch_loss"] <= s["first_epoch_loss"] for s in trained)


@pytest.mark.parametrize("start, message", [
    ({"method": "dare"}, "task_vectors.start.method 'dare' needs the whole model at once"),
    ({"method": "lines"}, "task_vectors.start.method 'lines' needs the whole model at once"),
    ({"method": "ties"}, "set task_vectors.start.args.trim_scope: tensor"),
])
def test_a_start_that_needs_the_whole_model_is_refused_for_progressive_learning(recipe_dict, zoo, tmp_path, start, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe_dict(zoo, tmp_path, objectives=[], trainer=QUIET, task_vectors={"start": start},
                                progressive={"epochs": 1}))


# ---------------------------------------------------------------------- the trainer: Lightning's own surface


class CountSteps(L.Callback):
    """Counts training batches; the instances made from a recipe are kept so the test can read them."""

    made: list["CountSteps"] = []

    def __init__(self, start: int = 0):
        self.steps = start
        CountSteps.made.append(self)

    def on_train_batch_end(self, trainer, module, outputs, batch, index):
        self.steps += 1


def test_loggers_callbacks_and_trainer_arguments_reach_lightning(zoo, recipe_dict, tmp_path, monkeypatch):
    trainers = []
    original = learners.build_trainer
    monkeypatch.setattr(learners, "build_trainer", lambda recipe, work: trainers.append(original(recipe, work)) or trainers[-1])
    trainer = recipe_dict(zoo, tmp_path)["trainer"]
    trainer.update(
        loggers=[{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "mine")}}],
        callbacks=[{"class_path": "test_builders.CountSteps", "init_args": {"start": 100}}],
        extra={"gradient_clip_val": 0.5},
    )
    result = runner.fit(load_recipe(recipe_dict(zoo, tmp_path, name="surface", trainer=trainer)))
    assert trainers[0].gradient_clip_val == 0.5
    assert CountSteps.made[-1].steps == 100 + 4  # max_steps 4
    mine = list((tmp_path / "mine").rglob("metrics.csv"))
    assert mine and "loss" in mine[0].read_text().splitlines()[0]  # the user's logger saw the training log
    assert (result.run_dir / "metrics.csv").exists()  # and the run keeps its own


@pytest.mark.parametrize("trainer, message", [
    ({"extra": {"max_steps": 3}}, "trainer.extra.max_steps: set by adamerge itself"),
    ({"loggers": [{"class_path": "no.such.Logger"}]}, r"trainer.loggers\[0\]: cannot import 'no.such.Logger'"),
    ({"callbacks": [{"class": "x"}]}, r"trainer.callbacks\[0\]: expected \{class_path"),
])
def test_bad_lightning_settings_are_named(tmp_path, trainer, message):
    recipe = load_recipe({"problem": {"kind": "digits"}, "trainer": trainer})
    with pytest.raises(ValueError, match=message):
        learners.build_trainer(recipe, tmp_path)


def test_the_progress_bar_counts_steps_not_epochs(zoo, recipe_dict, tmp_path, monkeypatch):
    from adamerge.learning.progress import StepProgressBar

    bars = []
    original = learners.build_trainer

    def keep_bar(recipe, work):
        trainer = original(recipe, work)
        bars.extend(c for c in trainer.callbacks if isinstance(c, StepProgressBar))
        return trainer

    monkeypatch.setattr(learners, "build_trainer", keep_bar)
    trainer = {**recipe_dict(zoo, tmp_path)["trainer"], "progress_bar": True, "max_steps": 5}
    runner.fit(load_recipe(recipe_dict(zoo, tmp_path, name="bar", trainer=trainer)))
    bar = bars[0].train_progress_bar
    assert (bar.total, bar.n, bar.desc.rstrip(": ")) == (5, 5, "learning coefficients")
