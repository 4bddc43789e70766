"""Fisher merging by hand: the diagonal Fisher of a linear softmax model is the mean squared
gradient of log p(argmax), (e_ŷ − p) xᵀ per sample; equal Fishers average; an entry only one
expert has Fisher for takes that expert's value; the whole merge against the formula, and a
recipe through `adamerge merge`."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn

from adamerge.app import cli
from adamerge.io.checkpoints import open_weights
from adamerge.methods import METHODS
from adamerge.methods.calibration import Calibration
from adamerge.methods.fisher import FisherSums, diagonal_fisher
from adamerge.tasks.base import HeadTask
from fixtures.families import perturbed


def inputs(seed: int, rows: int = 7) -> torch.Tensor:
    return torch.randn(rows, 4, generator=torch.Generator().manual_seed(seed))


def calibration_for(backbone: nn.Module, data: dict[str, torch.Tensor]) -> Calibration:
    """The backbone's output as each task's logits, each task's rows in two batches."""
    batches = {name: (lambda x=x: [{"inputs": x[:3]}, {"inputs": x[3:]}]) for name, x in data.items()}
    return Calibration(backbone, {name: HeadTask(name) for name in data}, batches)


def hand_fisher(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mean over samples of ((e_ŷ − p) xᵀ)² and (e_ŷ − p)², ŷ = argmax p, p = softmax(W x + b)."""
    p = torch.softmax(x.double() @ weight.double().T + bias.double(), dim=-1)
    residual = torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1]).double() - p
    return (residual[:, :, None] * x.double()[:, None, :]).square().mean(0), residual.square().mean(0)


def test_the_fisher_of_a_linear_softmax_model_is_the_mean_squared_gradient_of_its_predicted_label():
    model = nn.Linear(4, 3)
    x = inputs(1)
    calibration = calibration_for(model, {"a": x})
    with torch.no_grad():
        weights = {"weight": model.weight * 1.5, "bias": model.bias - 0.2}  # the Fisher is the given weights'
    info = diagonal_fisher(calibration, "a", weights, batches=2)
    expected_weight, expected_bias = hand_fisher(weights["weight"], weights["bias"], x)
    torch.testing.assert_close(info["weight"].double(), expected_weight, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(info["bias"].double(), expected_bias, rtol=1e-5, atol=1e-7)
    first = diagonal_fisher(calibration, "a", weights, batches=1)  # the first batch's three samples only
    torch.testing.assert_close(first["bias"].double(), hand_fisher(weights["weight"], weights["bias"], x[:3])[1],
                               rtol=1e-5, atol=1e-7)


def test_equal_fishers_give_the_simple_average():
    taus = [{"w": torch.randn(3, 2, generator=torch.Generator().manual_seed(k))} for k in range(3)]
    info = {"w": torch.rand(3, 2) + 0.1}
    sums = FisherSums()
    for tau in taus:
        sums.add(info, tau)
    torch.testing.assert_close(sums.deltas()["w"], sum(t["w"] for t in taus) / 3)


def test_an_entry_only_one_expert_has_fisher_for_takes_its_value_and_one_none_has_the_mean():
    taus = [{"w": torch.tensor([1.0, 2.0, 3.0])}, {"w": torch.tensor([5.0, 7.0, 11.0])}]
    fishers = [{"w": torch.tensor([0.0, 0.0, 0.0])}, {"w": torch.tensor([0.5, 0.0, 2.0])}]
    sums = FisherSums()
    for info, tau in zip(fishers, taus):
        sums.add(info, tau)
    merged = sums.deltas()["w"]
    torch.testing.assert_close(merged[0], torch.tensor(5.0), rtol=1e-5, atol=0)  # expert 1 alone: its value
    torch.testing.assert_close(merged[2], torch.tensor(11.0), rtol=1e-5, atol=0)
    torch.testing.assert_close(merged[1], torch.tensor(4.5))  # no Fisher anywhere: the floor, the plain mean


def test_each_fisher_is_normalised_by_its_own_norm_and_weighted_by_its_coefficient():
    taus = [{"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([3.0, 3.0])}]
    fishers = [{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([60.0, 80.0])}]  # the same once normalised
    normalised = FisherSums()
    raw = FisherSums(normalize=False)
    for (info, tau), coefficient in zip(zip(fishers, taus), (1.0, 3.0)):
        normalised.add(info, tau, coefficient)
        raw.add(info, tau)
    torch.testing.assert_close(normalised.deltas()["w"], torch.tensor([2.5, 2.5]))  # (1·1 + 3·3) / (1 + 3)
    torch.testing.assert_close(raw.deltas()["w"], torch.tensor([(3 + 180) / 63, (4 + 240) / 84]))


def test_the_merge_is_the_normalised_fisher_weighted_average_of_the_experts():
    base = nn.Linear(4, 3)
    experts = {"a": perturbed(base, 1, 0.8).requires_grad_(False), "b": perturbed(base, 2, 0.8).requires_grad_(False)}
    data = {"a": inputs(3), "b": inputs(4) * 2}
    merged = METHODS.get("fisher")(base, experts, calibration=calibration_for(base, data), coefficients=[1.0, 2.0])
    fishers = {name: hand_fisher(e.weight, e.bias, data[name]) for name, e in experts.items()}
    for index, key in enumerate(("weight", "bias")):
        weights = []
        for (name, expert), lam in zip(experts.items(), (1.0, 2.0)):
            norm = torch.sqrt(sum(f.square().sum() for f in fishers[name]))
            weights.append(lam * (fishers[name][index] / norm).clamp(min=1e-6))
        values = [getattr(e, key).double() for e in experts.values()]
        expected = sum(w * v for w, v in zip(weights, values)) / sum(weights)
        torch.testing.assert_close(getattr(merged, key).double(), expected, rtol=1e-4, atol=1e-5)


def test_bad_arguments_and_missing_calibration_data_are_refused():
    base = nn.Linear(4, 3)
    experts = {"a": perturbed(base, 1), "b": perturbed(base, 2)}
    calibration = calibration_for(base, {"a": inputs(1), "b": inputs(2)})
    with pytest.raises(ValueError, match=r"fisher: coefficients has 1 values but there are 2 experts"):
        METHODS.get("fisher")(base, experts, calibration=calibration, coefficients=[1.0])
    with pytest.raises(ValueError, match=r"fisher: coefficients must be > 0"):
        METHODS.get("fisher")(base, experts, calibration=calibration, coefficients=[1.0, 0.0])
    with pytest.raises(ValueError, match=r"fisher: floor must be > 0"):
        METHODS.get("fisher")(base, experts, calibration=calibration, floor=0.0)
    no_b = Calibration(base, calibration.tasks, {"a": calibration.batches["a"]})
    with pytest.raises(ValueError, match=r"^task 'b' has no calibration data"):
        METHODS.get("fisher")(base, experts, calibration=no_b)


def test_a_recipe_runs_through_adamerge_merge(zoo, recipe_dict, tmp_path, capsys):
    recipe = recipe_dict(zoo, tmp_path, name="fisher", method={"name": "fisher", "args": {"batches": 1}})
    path = tmp_path / "fisher.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli.main(["merge", str(path)]) == 0, capsys.readouterr().err
    assert sorted(json.loads((tmp_path / "fisher" / "eval.json").read_text())) == ["a", "b"]
    merged = dict(open_weights(str(tmp_path / "fisher" / "merged")))
    a, b = (dict(open_weights(str(zoo / "zoo" / t))) for t in ("a", "b"))
    key = "encoder.layer.0.attention.self.query.weight"
    low, high = torch.minimum(a["bert." + key], b["bert." + key]), torch.maximum(a["bert." + key], b["bert." + key])
    assert ((merged[key] >= low - 1e-6) & (merged[key] <= high + 1e-6)).all()  # a weighted average, entry by entry
    assert not torch.allclose(merged[key], (a["bert." + key] + b["bert." + key]) / 2)
