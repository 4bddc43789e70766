"""The objective protocol (objectives/base): the registry (the closest name to an unknown one,
dotted paths to a class or a function outside the package, unknown arguments named, plain functions
registered) and weighted combinations of objectives with their penalties and hidden layers."""

from __future__ import annotations

import pytest
import torch

from adamerge.learning.data import collate_rows, rows_to_batch
from adamerge.objectives import (
    OBJECTIVES,
    FunctionObjective,
    Objective,
    WeightedObjectives,
    build_objective,
)
from adamerge.objectives.alignment import ExpertAlignment, L1ToInit, coefficient_drift
from adamerge.objectives.entropy import Entropy, InfoMax
from adamerge.tasks.base import TaskOutput

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

# ---------------------------------------------------------------------- registry

EXTERNAL_CALLS = []


class ScaledEntropy(Objective):
    """An objective living outside the package, named by dotted path."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, output, batch, task):
        return self.scale * Entropy()(output, batch, task)


def max_logit_loss(output, batch, task, offset: float = 0.0):
    EXTERNAL_CALLS.append(task)
    return output.logits.max(dim=-1).values.mean() + offset


def test_an_unknown_objective_name_gets_the_closest_and_the_registered():
    with pytest.raises(KeyError) as info:
        build_objective("entrophy")
    message = str(info.value)
    assert message.startswith("unknown objective 'entrophy' (did you mean 'entropy'?); use one of [")
    assert message.endswith("] or a dotted path package.module:Name")
    for name in ("entropy", "infomax", "alignment", "expert_kl", "l1_to_init", "cross_entropy"):
        assert name in OBJECTIVES and repr(name) in message


def test_registry_dotted_paths_class_and_function(kit):
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]])
    out = TaskOutput(logits)
    obj = build_objective("test_objectives_base:ScaledEntropy", scale=2.0)
    assert isinstance(obj, ScaledEntropy)
    assert float(obj(out, {}, "t")) == pytest.approx(2 * float(kit.hand_entropy(logits).mean()), rel=1e-6)
    assert isinstance(build_objective("test_objectives_base.ScaledEntropy"), ScaledEntropy)

    fn = build_objective("test_objectives_base:max_logit_loss", offset=0.5)
    assert isinstance(fn, FunctionObjective)
    assert float(fn(out, {}, "task-a")) == pytest.approx((2.0 + 3.0) / 2 + 0.5)
    assert EXTERNAL_CALLS[-1] == "task-a"
    assert float(build_objective("test_objectives_base.max_logit_loss")(out, {}, "t")) == pytest.approx(2.5)
    with pytest.raises(KeyError, match="cannot import objective 'no_such_module_xyz:Thing'"):
        build_objective("no_such_module_xyz:Thing")
    with pytest.raises(KeyError, match="cannot import objective 'test_objectives_base:NoSuchThing'"):
        build_objective("test_objectives_base:NoSuchThing")


def test_registry_unknown_argument_is_named():
    with pytest.raises(TypeError, match="temprature"):
        build_objective("entropy", temprature=2.0)
    with pytest.raises(TypeError, match="bogus"):
        build_objective("test_objectives_base:max_logit_loss", bogus=1)
    with pytest.raises(TypeError, match="hidden_layer"):
        build_objective("alignment", hidden_layer=[1])
    assert build_objective("alignment", hidden_layers=[2], l1_weight=0.1).hidden_layers == (2,)


def test_register_plain_function():
    name = "_test_mean_logit"
    try:
        OBJECTIVES.register(name)(max_logit_loss)
        obj = build_objective(name, offset=1.0)
        assert float(obj(TaskOutput(torch.tensor([[1.0, 4.0]])), {}, "t")) == pytest.approx(5.0)
        with pytest.raises(ValueError, match="an objective named '_test_mean_logit' is already registered"):
            OBJECTIVES.register(name)(ScaledEntropy)
    finally:
        OBJECTIVES.unregister(name)


def test_weighted_objectives_combine_weights_penalties_and_hidden_layers(kit):
    _, _, merged = kit.mlp_merge("layer", init=0.3)
    rows = {"t0": kit.sequence_rows(5, seed=7)}
    task = kit.sequence_task("t0")
    align1 = ExpertAlignment(hidden_layers=[1], l1_weight=0.5)
    align0 = ExpertAlignment(hidden_layers=[0], logits_weight=0.0)
    entropy, l1 = Entropy(), L1ToInit()
    combined = WeightedObjectives([(2.0, align1), (0.5, entropy), (3.0, l1), (1.5, align0)], names=["a1", "ent", "l1", "a0"])
    assert combined.hidden_layers == (0, 1)
    combined.setup(kit.context_for(merged, {"t0": task}, rows))
    assert "t0" in align1.targets and "t0" in align0.targets

    with torch.no_grad():
        merged.coefficients.raw.add_(0.1 * torch.arange(12.0).view(2, 6) / 12)
    batch = collate_rows(rows["t0"], [3, 1], rows_to_batch)
    output = task(merged, merged.merged_parameters(), batch, combined.hidden_layers)
    total, logs = combined(output, batch, "t0")
    parts = {
        "a1": float(align1(output, batch, "t0")[0]),
        "ent": float(entropy(output, batch, "t0")),
        "l1": 0.0,
        "a0": float(align0(output, batch, "t0")[0]),
    }
    expected = 2.0 * parts["a1"] + 0.5 * parts["ent"] + 1.5 * parts["a0"]
    assert float(total) == pytest.approx(expected, rel=1e-5)
    for name, value in parts.items():
        assert float(logs[name]) == pytest.approx(value, rel=1e-5)
    assert "a1/kl" in logs and "a1/mse1" in logs and "a0/mse0" in logs
    drift = float(coefficient_drift(merged))
    assert drift > 0
    assert float(combined.penalty(merged)) == pytest.approx(2.0 * 0.5 * drift + 3.0 * drift, rel=1e-5)
    assert WeightedObjectives([(1.0, Entropy()), (2.0, InfoMax())]).penalty(merged) is None
