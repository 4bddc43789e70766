"""RegMean and RegMean++ against their closed forms, computed here by hand in float64 on tiny models
(numpy's solve, never the package's helpers); a recipe through `adamerge merge` end to end, and
a task without calibration data refused by name, and no data-driven method as a learning start."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from adamerge.app import cli, runner
from adamerge.app.config import RecipeError, load_recipe
from adamerge.io.checkpoints import open_weights
from adamerge.methods import METHODS
from adamerge.methods.calibration import Calibration
from adamerge.methods.regmean import block_names, layer_stages, linear_layers
from adamerge.tasks.base import HeadTask
from fixtures.families import perturbed


def inputs(seed: int, rows: int = 12, width: int = 4) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))


def calibration_for(backbone: nn.Module, data: dict[str, torch.Tensor]) -> Calibration:
    """Tasks that run the backbone as it is (logits = its output), each task's rows in two batches."""
    tasks = {name: HeadTask(name) for name in data}
    batches = {name: (lambda x=x: [{"inputs": x[:5]}, {"inputs": x[5:]}]) for name, x in data.items()}
    return Calibration(backbone, tasks, batches)


def gram(x: torch.Tensor) -> np.ndarray:
    x = x.double().numpy()
    return x.T @ x / len(x)


def closed_form(grams: list[np.ndarray], weights: list[torch.Tensor], alpha: float) -> np.ndarray:
    """``Wᵀ = (Σ G̃_k)⁻¹ Σ G̃_k W_kᵀ``, ``G̃ = G`` with its off-diagonal entries times ``alpha``."""
    reduced = [g * alpha + np.diag(np.diag(g)) * (1 - alpha) for g in grams]
    rhs = sum(g @ w.detach().double().numpy().T for g, w in zip(reduced, weights))
    return np.linalg.solve(sum(reduced), rhs).T


def close(actual: torch.Tensor, expected, atol: float = 1e-5) -> None:
    expected = expected.detach().double().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    np.testing.assert_allclose(actual.detach().double().numpy(), expected, atol=atol, rtol=1e-5)


@pytest.fixture
def one_layer():
    base = nn.Sequential(nn.Linear(4, 3))
    experts = {"a": perturbed(base, 1, 0.5), "b": perturbed(base, 2, 0.5)}
    data = {"a": inputs(1) * torch.tensor([1.0, 2.0, 0.5, 1.0]) + 0.3, "b": inputs(2)}
    return base, experts, data


@pytest.mark.parametrize("alpha", [1.0, 0.95, 0.5])
def test_a_single_linear_layer_is_the_closed_form(one_layer, alpha):
    base, experts, data = one_layer
    merged = METHODS.get("regmean")(base, experts, calibration=calibration_for(base, data), alpha=alpha)
    expected = closed_form([gram(data["a"]), gram(data["b"])], [e[0].weight for e in experts.values()], alpha)
    close(merged[0].weight, expected)
    close(merged[0].bias, (experts["a"][0].bias + experts["b"][0].bias) / 2)  # not a linear weight: the mean


def test_alpha_zero_is_the_gram_diagonal_weighted_average_per_input_column(one_layer):
    base, experts, data = one_layer
    merged = METHODS.get("regmean")(base, experts, calibration=calibration_for(base, data), alpha=0.0)
    diagonals = [np.diag(gram(data[name])) for name in ("a", "b")]
    weights = [experts[name][0].weight.detach().double().numpy() for name in ("a", "b")]
    expected = sum(d * w for d, w in zip(diagonals, weights)) / sum(diagonals)  # column j weighted by Σ x_j²
    close(merged[0].weight, expected)


@pytest.mark.parametrize("name", ["regmean", "regmean_plusplus"])
def test_one_expert_is_returned_exactly(name):
    base = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), nn.LayerNorm(3))
    expert = perturbed(base, 3, 0.5)
    merged = METHODS.get(name)(base, {"a": expert}, calibration=calibration_for(base, {"a": inputs(4)}))
    for key, value in expert.state_dict().items():  # ReLU units dead on every input get the mean: the expert's
        close(merged.state_dict()[key], value, atol=1e-5)


def test_tensors_other_than_linear_weights_get_the_mean():
    base = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))
    experts = {name: perturbed(base, seed, 0.3) for name, seed in (("a", 5), ("b", 6), ("c", 7))}
    data = {name: inputs(seed) for name, seed in (("a", 8), ("b", 9), ("c", 10))}
    merged = METHODS.get("regmean")(base, experts, calibration=calibration_for(base, data)).state_dict()
    for key in ("0.bias", "1.weight", "1.bias", "3.bias"):
        close(merged[key], sum(e.state_dict()[key] for e in experts.values()) / 3)
    assert not torch.allclose(merged["0.weight"], sum(e[0].weight for e in experts.values()) / 3)


def test_regmean_plusplus_takes_the_second_layers_inputs_from_the_merged_first():
    base = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    experts = {"a": perturbed(base, 11, 0.6), "b": perturbed(base, 12, 0.6)}
    data = {"a": inputs(13) + 0.5, "b": inputs(14)}
    alpha = 0.9
    first = closed_form([gram(data["a"]), gram(data["b"])], [e[0].weight for e in experts.values()], alpha)
    first_bias = sum(e[0].bias.double() for e in experts.values()) / 2

    def hidden(x, weight, bias):  # the second layer's inputs
        with torch.no_grad():
            return torch.tanh(x.double() @ torch.as_tensor(weight).T + bias.double())

    own = [gram(hidden(data[n], e[0].weight.double(), e[0].bias)) for n, e in experts.items()]
    through_merged = [gram(hidden(data[n], first, first_bias)) for n in experts]
    second = [e[2].weight for e in experts.values()]

    plus = METHODS.get("regmean_plusplus")(base, experts, calibration=calibration_for(base, data), alpha=alpha)
    plain = METHODS.get("regmean")(base, experts, calibration=calibration_for(base, data), alpha=alpha)
    close(plus[0].weight, first)
    close(plain[0].weight, first)  # the first layer's inputs are the data: the same for both
    close(plus[2].weight, closed_form(through_merged, second, alpha))
    close(plain[2].weight, closed_form(own, second, alpha))
    assert np.abs(closed_form(through_merged, second, alpha) - closed_form(own, second, alpha)).max() > 1e-3


def test_layers_are_blocks_and_the_linear_modules_outside_them():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 4)
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(2))
            self.small = nn.ModuleList([nn.Linear(4, 4)])
            self.head = nn.Linear(4, 2)

    net = Net()
    keys = [name for name, _ in net.named_parameters()]
    layers = linear_layers(net, keys)
    assert set(layers) == {"blocks.0.0", "blocks.1.0", "small.0", "head"}
    assert block_names(net) == ["blocks.0", "blocks.1"]  # the largest ModuleList of one class
    stages = layer_stages(net, keys, layers)
    assert stages[0] == ["embed.weight"]  # outside every layer: merged first
    assert stages[1] == [k for k in keys if k.startswith("blocks.0.")] and stages[2][0].startswith("blocks.1.")
    assert stages[3:] == [["small.0.weight", "small.0.bias"], ["head.weight", "head.bias"]]


def test_an_expert_without_calibration_data_is_refused_by_name(one_layer):
    base, experts, data = one_layer
    no_data = Calibration(base, {name: HeadTask(name) for name in experts}, {"a": lambda: [{"inputs": data["a"]}]})
    with pytest.raises(ValueError, match=r"^task 'b' has no calibration data \(problem.tasks.b.calibration\)"):
        METHODS.get("regmean")(base, experts, calibration=no_data)
    with pytest.raises(ValueError, match=r"^expert 'b' has no task of its name"):
        METHODS.get("regmean_plusplus")(base, experts, calibration=calibration_for(base, {"a": data["a"]}))


# ---------------------------------------------------------------------------- through adamerge merge


def test_a_recipe_runs_end_to_end_through_adamerge_merge(zoo, recipe_dict, tmp_path, capsys):
    for name in ("regmean", "regmean_plusplus"):
        recipe = recipe_dict(zoo, tmp_path, name=name, method={"name": name, "args": {"batches": 2}})
        recipe.pop("coefficients"), recipe.pop("optimizer")
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        assert cli.main(["merge", str(path)]) == 0, capsys.readouterr().err
        results = json.loads((tmp_path / name / "eval.json").read_text())
        assert sorted(results) == ["a", "b"] and results["b"]["samples"] == 20
        assert f"data-driven `{name}`" in (tmp_path / name / "merged" / "README.md").read_text()
        assert runner.evaluate_run(tmp_path / name) == results  # re-merged from the recipe, the same
    weights = {name: dict(open_weights(str(tmp_path / name / "merged"))) for name in ("regmean", "regmean_plusplus")}
    a, b = (dict(open_weights(str(p))) for p in (zoo / "zoo" / "a", zoo / "zoo" / "b"))
    query = "encoder.layer.1.attention.self.query.weight"
    assert not torch.allclose(weights["regmean"][query], (a["bert." + query] + b["bert." + query]) / 2)
    assert not torch.allclose(weights["regmean"][query], weights["regmean_plusplus"][query])  # layer 1 sees merged layer 0
    norm = "encoder.layer.1.output.LayerNorm.weight"
    torch.testing.assert_close(weights["regmean"][norm], (a["bert." + norm] + b["bert." + norm]) / 2)


def test_a_recipe_with_a_task_lacking_calibration_data_is_refused_naming_it(zoo, recipe_dict, tmp_path, capsys):
    recipe = recipe_dict(zoo, tmp_path, name="refused", method={"name": "regmean"})
    recipe.pop("coefficients"), recipe.pop("optimizer")
    del recipe["problem"]["tasks"]["b"]["calibration"]
    path = tmp_path / "refused.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli.main(["merge", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: task 'b' has no calibration data") and len(err.splitlines()) == 1
    assert not (tmp_path / "refused").exists()


def test_a_data_driven_method_cannot_be_a_learning_start(zoo, recipe_dict, tmp_path):
    recipe = recipe_dict(zoo, tmp_path, task_vectors={"start": {"method": "regmean"}})
    with pytest.raises(RecipeError, match=r"task_vectors.start.method 'regmean' runs the experts on calibration data"):
        load_recipe(recipe)
    load_recipe(recipe_dict(zoo, tmp_path, task_vectors={"start": {"method": "sequential_projection"}}))  # data-free
