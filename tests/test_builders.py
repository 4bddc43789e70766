"""Recipe sections to objects (adamerge.app.builders): progressive learning from a data-free start."""

from __future__ import annotations

import pytest
import torch

from adamerge.app import runner
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
