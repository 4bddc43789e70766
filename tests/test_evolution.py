"""CMA-ES over coefficients (adamerge.learning.evolution): it finds a quadratic's optimum, keeps a
constraint's bounds, refuses what it cannot search, scores candidates as the task loss does, and
resumes from its checkpoint to the same bits. (The learner on the digits zoo: test_learners.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from adamerge.core.coefficients import MergeCoefficients
from adamerge.core.element import ElementCoefficients
from adamerge.core.layouts import build_layout
from adamerge.learning import evolution
from adamerge.learning.evolution import CMAESOptions, MAX_DIMENSIONS, cmaes_options, cmaes_search, option_problems, search_space

SHAPES = {"w": (3, 4), "v": (4,)}
TARGET = torch.tensor([[0.1, -0.4], [0.7, 0.25]])  # [experts, tensors]: a layer-wise optimum


def coefficients(constraint=None, init=0.3) -> MergeCoefficients:
    return MergeCoefficients(build_layout(["a", "b"], SHAPES, "layer"), init=init, constraint=constraint)


def quadratic(c: MergeCoefficients, target=TARGET):
    return lambda: float(((c().detach() - target) ** 2).sum())


def test_it_reaches_a_quadratics_optimum():
    c = coefficients()
    result = cmaes_search(c, quadratic(c), CMAESOptions(popsize=8, sigma0=0.3, generations=300), progress=False)
    assert torch.allclose(c().detach(), TARGET, atol=1e-5)
    assert result.best < 1e-10 and result.best == pytest.approx(quadratic(c)(), abs=0)  # it ends at the best candidate
    assert result.dimensions == 4 and result.popsize == 8
    best = [row["train/best_loss"] for row in result.log]
    assert best == sorted(best, reverse=True) and len(result.log) < 300  # it stopped once converged


@pytest.mark.parametrize("constraint", [{"name": "clamp", "lo": 0.0, "hi": 0.5}, {"name": "sigmoid", "lo": 0.0, "hi": 0.5}])
def test_the_effective_values_stay_inside_the_constraint(constraint):
    """The optimum's 0.7 lies outside [0, 0.5] and -0.4 below it: the search ends on the bounds,
    every candidate scored (its effective values) inside them."""
    c = coefficients(constraint)
    seen = []

    def score():
        seen.append(c().detach().clone())
        return quadratic(c)()

    cmaes_search(c, score, CMAESOptions(popsize=8, sigma0=0.2, generations=150), progress=False)
    assert all(float(v.min()) >= 0.0 and float(v.max()) <= 0.5 for v in seen)
    # two slots sit on a plateau of the score (clamped, or a sigmoid's tail), which slows the others
    assert torch.allclose(c().detach(), TARGET.clamp(0.0, 0.5), atol=2e-4)
    assert float(c.raw.detach().min()) >= 0.0 or constraint["name"] == "sigmoid"  # a clamp's raw values end inside too


def test_the_search_starts_at_the_init_and_frozen_slots_stay():
    layout = build_layout(["a", "b"], SHAPES, "layer", freeze=["^v$"])
    c = MergeCoefficients(layout, init=[0.2, 0.6])
    assert search_space(c).tolist() == pytest.approx([0.2, 0.6])  # only w's slot per expert is searched
    cmaes_search(c, quadratic(c), CMAESOptions(popsize=6, generations=5), progress=False)
    assert c()[:, layout.tensor_slots["v"][0]].tolist() == pytest.approx([0.2, 0.6])


def test_element_wise_and_too_many_coefficients_are_refused_naming_the_field():
    element = ElementCoefficients(build_layout(["a", "b"], SHAPES, "element"), SHAPES)
    with pytest.raises(ValueError, match=r"^coefficients\.granularity: CMA-ES searches task-, layer-, group- or chunk-wise"):
        search_space(element)
    wide = MergeCoefficients(build_layout(["a", "b"], {"w": (MAX_DIMENSIONS, 2)}, "chunk", chunks=MAX_DIMENSIONS))
    with pytest.raises(ValueError, match=rf"^coefficients\.granularity 'chunk' gives {2 * MAX_DIMENSIONS} trainable"):
        search_space(wide)


def test_bad_arguments_are_named_one_line_each():
    assert option_problems({"popsize": 6, "sigma0": 0.5, "generations": 3}) == []
    problems = option_problems({"popsize": 1, "sigma0": -1, "generations": 2.5, "lr": 0.1})
    assert problems == [
        "optimizer.args.lr is not a CMA-ES argument; use ['popsize', 'sigma0', 'generations']",
        "optimizer.args.popsize is 1; use an integer >= 2",
        "optimizer.args.sigma0 is -1; use a number > 0",
        "optimizer.args.generations is 2.5; use an integer >= 1",
    ]
    with pytest.raises(ValueError, match=r"^optimizer\.args\.popsize is True; use an integer >= 2$"):
        cmaes_options({"popsize": True})
    assert cmaes_options({}) == CMAESOptions()


def test_the_scorer_is_the_weighted_balanced_task_loss_on_every_row(mlp_problem):
    from adamerge.learning.data import ordered_batches
    from adamerge.learning.loss import TaskLoss
    from adamerge.objectives import build_objective

    merged, tasks, data = mlp_problem()
    objective = build_objective("entropy")
    batches = {name: list(ordered_batches(name, rows, 5)) for name, rows in data.items()}  # t1: 15 rows, 3 batches
    loss = TaskLoss(tasks, objective, {"t0": 2.0}, task_balance="log")
    score = evolution.Scorer(merged, loss, batches, torch.device("cpu"))
    with torch.no_grad():
        params = merged.merged_parameters()
        by_hand = {}
        for name, rows in data.items():
            inputs = torch.stack([r["inputs"] for r in rows])
            by_hand[name] = float(objective(tasks[name](merged, params, {"inputs": inputs}), {}, name))
    assert score.task_losses() == pytest.approx(by_hand, rel=1e-5)
    assert score() == pytest.approx(2.0 * math.log(by_hand["t0"] + 1e-6) + math.log(by_hand["t1"] + 1e-6), rel=1e-5)


def test_an_interrupted_search_resumes_to_the_same_bits(tmp_path, crash):
    options = CMAESOptions(popsize=6, sigma0=0.2, generations=7)
    whole = coefficients()
    expected = cmaes_search(whole, quadratic(whole), options, seed=3, progress=False)

    cut = coefficients()
    crash.arm(evolution, "_save_scores", after=3)
    with pytest.raises(crash.error):
        cmaes_search(cut, quadratic(cut), options, seed=3, checkpoint=tmp_path / "scores.safetensors", progress=False)
    resumed = coefficients()
    crash.arm(evolution, "_save_scores")  # counting only
    result = cmaes_search(resumed, quadratic(resumed), options, seed=3, checkpoint=tmp_path / "scores.safetensors", progress=False)
    assert crash.calls == 4  # generations 4-7 were scored; 1-3 replayed from the checkpoint
    assert torch.equal(resumed.raw, whole.raw) and result.log == expected.log
    with pytest.raises(ValueError, match="written for another search space or popsize: delete it"):
        cmaes_search(coefficients(), lambda: 0.0, CMAESOptions(popsize=5), checkpoint=tmp_path / "scores.safetensors",
                     progress=False)
