"""Lightning's own surface from a recipe: extra loggers and callbacks by class path, any other
Trainer argument; clashes with what adamerge manages and bad class paths are named."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import lightning as L  # noqa: E402

from adamerge.app import learners, runner  # noqa: E402
from adamerge.app.config import load_recipe  # noqa: E402


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
        callbacks=[{"class_path": "test_lightning_surface.CountSteps", "init_args": {"start": 100}}],
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
