"""Label-free model selection as a Lightning callback: it keeps the step whose held-out criterion
(computed here by hand, without adamerge's loss code) is lowest, finishes on it, and a run
interrupted after a selection check resumes to the same coefficients and the same choice."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch.func import functional_call

from adamerge.app import learners, runner
from adamerge.app.config import load_recipe
from adamerge.learning.data import CalibrationData
from adamerge.learning.learner import CoefficientLearner
from adamerge.learning.selection import LabelFreeSelection
from adamerge.objectives import Objective
from adamerge.objectives.alignment import ExpertKL

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LR, EVERY, SIZES = 0.25, 2, {"t0": 12, "t1": 12}


class Push(Objective):
    """Moves every coefficient up by exactly ``lr`` per SGD step (gradient −1), whatever the data."""

    def forward(self, output, batch, task):
        return output.logits.sum() * 0.0

    def penalty(self, merged):
        return -merged.coefficients().sum()


@pytest.fixture
def pushed(mlp_problem, lightning_fit):
    """``pushed(steps, callbacks, ckpt_path, every)``: two tasks, each with its own expert; task-wise
    coefficients walk 0, 0.25, 0.5, ... together, so the held-out KL to the experts falls, bottoms
    out near c = 1 and rises again. Returns (learner, selection, calibration, pristine models)."""

    def run(steps, callbacks=(), ckpt_path=None, every=EVERY):
        merged, tasks, data = mlp_problem(granularity="task", init=0.0, sizes=SIZES)
        pristine = {"backbone": copy.deepcopy(merged.backbone), "experts": {n: merged.expert_parameters(n) for n in tasks}}
        learner = CoefficientLearner(merged, tasks, Push(), lr=LR, optimizer="sgd")
        selection = LabelFreeSelection(ExpertKL(), every_n_steps=every)
        calibration = CalibrationData(data, batch_size=4, holdout=4)
        lightning_fit(learner, calibration, steps, [selection, *callbacks], ckpt_path)
        return learner, selection, calibration, pristine

    return run


@torch.no_grad()
def by_hand(c: float, tasks, calibration, pristine) -> float:
    """Mean over tasks of KL(expert ‖ merged) over the task's held-out rows, θ = θ_0 + c·Σ_k τ_k written out."""
    backbone = pristine["backbone"]
    theta0 = dict(backbone.named_parameters())
    experts = pristine["experts"]
    theta = {k: theta0[k] + c * sum(experts[n][k] - theta0[k] for n in experts) for k in theta0}
    values = []
    for name, task in tasks.items():
        (batch,) = list(calibration.holdout_batches(name))  # 4 rows: one batch
        merged_logits = task.head(functional_call(backbone, theta, (batch["inputs"],)))
        expert_logits = task.head(functional_call(backbone, experts[name], (batch["inputs"],)))
        p, log_p, log_q = expert_logits.softmax(-1), expert_logits.log_softmax(-1), merged_logits.log_softmax(-1)
        values.append(float((p * (log_p - log_q)).sum(-1).mean()))
    return sum(values) / len(values)


def test_selection_keeps_the_step_with_the_lowest_held_out_criterion_and_restores_it(pushed, checkpointing, tmp_path):
    steps = 10
    learner, selection, calibration, pristine = pushed(steps, [checkpointing(tmp_path, steps)])
    criteria = {s: by_hand(LR * s, learner.tasks, calibration, pristine) for s in range(0, steps + 1, EVERY)}
    best = min(criteria, key=criteria.get)
    assert 0 < best < steps  # the test means something only if the best is neither the start nor the end
    assert selection.best["step"] == best
    assert selection.best["value"] == pytest.approx(criteria[best], rel=1e-5, abs=1e-7)
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert float(last["state_dict"]["merged.coefficients.raw"][0, 0]) == LR * steps  # where training ended
    torch.testing.assert_close(learner.merged.coefficients(), torch.full((2, 1), LR * best))  # ... restored to the best
    assert selection.criterion(learner) == pytest.approx(criteria[best], rel=1e-5, abs=1e-7)


def test_an_expert_kl_criterion_is_zero_at_the_expert(mlp_problem, lightning_fit):
    # one task, one expert: the held-out KL is exactly zero at c = 1 (step 4) and grows after it
    merged, tasks, data = mlp_problem(granularity="task", init=0.0, experts=("t0",), sizes={"t0": 12})
    selection = LabelFreeSelection(ExpertKL(), every_n_steps=1)
    learner = CoefficientLearner(merged, tasks, Push(), lr=LR, optimizer="sgd")
    lightning_fit(learner, CalibrationData(data, batch_size=4, holdout=0.25), 8, [selection])
    assert selection.best["step"] == 4 and abs(selection.best["value"]) < 1e-6
    assert float(merged.coefficients()) == 1.0
    with torch.no_grad():
        merged.coefficients.raw.fill_(2.0)
    assert selection.criterion(learner) > 1e-4


def test_without_held_out_rows_there_is_nothing_to_select_on(mlp_problem, lightning_fit):
    merged, tasks, data = mlp_problem(granularity="task", init=0.0, experts=("t0",), sizes={"t0": 12})
    learner = CoefficientLearner(merged, tasks, Push(), lr=LR, optimizer="sgd")
    with pytest.raises(ValueError, match="holdout"):
        lightning_fit(learner, CalibrationData(data, batch_size=4), 2, [LabelFreeSelection(ExpertKL())])
    with pytest.raises(ValueError, match="every_n_steps"):
        LabelFreeSelection(ExpertKL(), every_n_steps=0)


@pytest.mark.parametrize("interrupt_at", [6, 7])  # after the best step: right after a check, and between two
def test_a_run_interrupted_after_a_check_resumes_to_the_same_coefficients_and_choice(pushed, checkpointing, tmp_path, interrupt_at):
    steps = 10
    straight, straight_selection, _, _ = pushed(steps, every=EVERY)
    _, partial, _, _ = pushed(interrupt_at, [checkpointing(tmp_path, interrupt_at)])
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    state = checkpoint["callbacks"]["LabelFreeSelection"]
    assert state["checked_step"] == interrupt_at - interrupt_at % EVERY  # the check of that step is in the checkpoint
    resumed, selection, _, _ = pushed(steps, ckpt_path=tmp_path / "last.ckpt")
    assert torch.equal(resumed.merged.coefficients.raw, straight.merged.coefficients.raw)
    assert selection.best["step"] == straight_selection.best["step"]
    assert selection.best["value"] == straight_selection.best["value"]
    assert selection.reference == straight_selection.reference


# ---------------------------------------------------------------------- through a recipe


def test_a_recipe_with_selection_exports_the_selected_step(zoo, recipe_dict, tmp_path, monkeypatch):
    made = []
    build_selection = learners.build_selection
    monkeypatch.setattr(learners, "build_selection", lambda *args: made.append(build_selection(*args)) or made[-1])
    selection = {"objective": {"name": "entropy"}, "holdout": 4, "every_n_steps": 2}
    result = runner.fit(load_recipe(recipe_dict(zoo, tmp_path, selection=selection, export={"plot": False, "mergekit": False})))
    (callback,) = made
    chosen = json.loads((result.run_dir / "selection.json").read_text())
    assert chosen == {"step": callback.best["step"], "criterion": callback.best["value"]}
    assert chosen["step"] in (0, 2, 4) and callback.checked_step == 4
    saved = load_file(str(result.run_dir / "coefficients.safetensors"))
    assert torch.equal(saved["raw"], callback.best["state"]["raw"])


def test_a_selection_objective_the_run_trains_on_shares_its_targets(zoo, recipe_dict, tmp_path, monkeypatch):
    """expert_kl trained and selected on: one instance, its expert targets computed once over the
    calibration set (held-out rows included), not a second copy; another objective is its own."""
    from adamerge.objectives.alignment import ExpertKL

    made, setups = [], []
    build_selection = learners.build_selection
    monkeypatch.setattr(learners, "build_selection", lambda *args: made.append(build_selection(*args)) or made[-1])
    original = ExpertKL.setup
    monkeypatch.setattr(ExpertKL, "setup", lambda self, context: setups.append(self) or original(self, context))
    selection = {"objective": {"name": "expert_kl"}, "holdout": 4, "every_n_steps": 2}
    recipe = recipe_dict(zoo, tmp_path, name="shared", selection=selection, objectives=[{"name": "expert_kl"}],
                         export={"plot": False, "mergekit": False})
    runner.fit(load_recipe(recipe))
    (callback,) = made
    assert len(setups) == 1 and setups[0] is callback.objective
    assert callback.best is not None  # the shared targets served the held-out checks
    other = learners.build_selection(load_recipe({**recipe, "objectives": [{"name": "entropy"}]}), None)
    assert isinstance(other.objective, ExpertKL)
