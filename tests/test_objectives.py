"""Objectives against hand computations: entropy (and its coefficient gradient), infomax,
Expert Merging's alignment (KL, masked hidden MSE, L1 drift, targets from setup), cross-entropy,
the registry and weighted combinations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from adamerge import MergedModel, TaskVectors
from adamerge.learning.data import collate_rows, ordered_batches, rows_to_batch
from adamerge.objectives import (
    OBJECTIVES,
    FunctionObjective,
    Objective,
    ObjectiveContext,
    WeightedObjectives,
    build_objective,
)
from adamerge.objectives.alignment import ExpertAlignment, ExpertKL, L1ToInit, coefficient_drift, kl_to_teacher
from adamerge.objectives.entropy import Entropy, InfoMax
from adamerge.objectives.supervised import CrossEntropy
from adamerge.tasks.base import HeadTask, TaskOutput
from conftest import make_mlp, perturbed

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

# ---------------------------------------------------------------------- a tiny merge problem
# make_mlp: Linear(6,7) ReLU Linear(7,5) Tanh Linear(5,3); tensors 0.*, 2.*, 4.*


def mlp_merge(granularity="layer", init=0.3, freeze=None, experts=("t0", "t1")):
    base = make_mlp()
    named = {name: perturbed(base, seed=10 + k, scale=0.3) for k, name in enumerate(experts)}
    tv = TaskVectors.from_models(base, named)
    merged = MergedModel(copy.deepcopy(base), tv, granularity, init=init, freeze=freeze)
    return base, named, merged


def explicit_model(base: nn.Module, experts: dict, weights: dict[str, float]) -> nn.Module:
    """θ_0 + Σ_k w_k (θ_k − θ_0), written into a fresh copy of the base (task-wise weights)."""
    state = {}
    base_state = base.state_dict()
    for key, theta0 in base_state.items():
        value = theta0.clone()
        for name, w in weights.items():
            value += w * (experts[name].state_dict()[key] - theta0)
        state[key] = value
    model = copy.deepcopy(base)
    model.load_state_dict(state)
    return model.eval()


def hand_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    z = logits.double() / temperature
    p = z.exp() / z.exp().sum(dim=-1, keepdim=True)
    return -(p * p.log()).sum(dim=-1)


class MaskedSeqTask(HeadTask):
    """Token-wise MLP on ``[B, T, 6]`` inputs; logits are the mean over valid tokens; mask from the batch."""

    def __init__(self, name):
        super().__init__(name, hidden_modules=["1", "3"])  # ReLU output [B,T,7], Tanh output [B,T,5]
        self.calls = 0

    def forward(self, merged, params, batch, hidden_layers=()):
        self.calls += 1
        out = super().forward(merged, params, batch, hidden_layers)
        return TaskOutput(masked_mean(out.logits, batch["mask"]), out.hidden, mask=batch["mask"])


def masked_mean(x, mask):
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1)


def sequence_rows(n=7, seed=0):
    """Rows with 4 tokens, 2 to 4 of them valid; padded tokens are huge so counting them would show."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        valid = 2 + i % 3
        x = torch.randn(4, 6, generator=g)
        x[valid:] *= 50.0
        mask = torch.zeros(4, dtype=torch.long)
        mask[:valid] = 1
        rows.append({"inputs": x, "mask": mask})
    return rows


def context_for(merged, tasks, rows, batch_size=3):
    return ObjectiveContext(
        merged=merged,
        tasks=tasks,
        calibration_batches=lambda task: ordered_batches(task, rows[task], batch_size),
        device=torch.device("cpu"),
    )


def explicit_hidden(model: nn.Module, x: torch.Tensor):
    """(hidden0, hidden1, logits) of the MLP written out layer by layer."""
    h0 = torch.relu(model[0](x))
    h1 = torch.tanh(model[2](h0))
    return h0, h1, model[4](h1)


# ---------------------------------------------------------------------- entropy


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_entropy_equals_hand_computation(temperature):
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.1, 0.1], [5.0, -3.0, 1.0], [-0.5, 0.7, 0.2]])
    loss = Entropy(temperature)(TaskOutput(logits), {}, "t")
    expected = hand_entropy(logits, temperature).mean()
    assert loss.dim() == 0
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    # uniform logits: log C
    assert float(Entropy()(TaskOutput(torch.zeros(2, 5)), {}, "t")) == pytest.approx(math.log(5), rel=1e-6)


def test_entropy_gradient_matches_explicit_module():
    """∂H/∂c_k for every layer equals <∂H/∂θ_layer, τ_k> computed by autograd on a plain module."""
    base, experts, merged = mlp_merge("layer")
    with torch.no_grad():
        merged.coefficients.raw.copy_(torch.tensor([[0.3, 0.5, -0.2, 0.7, 0.1, 0.4], [0.6, -0.1, 0.2, 0.3, 0.9, 0.0]]))
    task = HeadTask("t0")
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(4))
    batch = {"inputs": x}
    loss = Entropy()(task(merged, merged.merged_parameters(), batch), batch, "t0")
    loss.backward()
    grad = merged.coefficients.raw.grad

    # reference: a plain copy holding θ = θ_0 + Σ_k c_k τ_k as leaf tensors
    names = list(merged.layout.slot_names)
    coefficient = merged.coefficients().detach()
    reference = copy.deepcopy(base)
    taus = {}
    with torch.no_grad():
        for key, param in reference.named_parameters():
            taus[key] = [experts[e].state_dict()[key] - base.state_dict()[key] for e in ("t0", "t1")]
            slot = names.index(key)
            param.copy_(base.state_dict()[key] + sum(coefficient[k, slot] * taus[key][k] for k in range(2)))
    reference.requires_grad_(True)
    ref_loss = hand_entropy(reference(x)).mean()
    ref_loss.backward()
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    for key, param in reference.named_parameters():
        slot = names.index(key)
        for k in range(2):
            expected = (param.grad * taus[key][k]).sum()
            torch.testing.assert_close(grad[k, slot], expected.float(), rtol=1e-4, atol=1e-7, msg=f"{key} expert {k}")
    assert grad.abs().sum() > 0


def test_infomax_equals_hand_computation():
    logits = torch.tensor([[3.0, 0.0, -1.0], [2.5, 0.5, 0.0], [0.0, 0.1, 2.0], [1.0, 1.0, 1.0]])
    lam, T = 0.7, 2.0
    loss, logs = InfoMax(diversity_weight=lam, temperature=T)(TaskOutput(logits), {}, "t")
    p = torch.softmax(logits.double() / T, dim=-1)
    conditional = (-(p * p.log()).sum(dim=-1)).mean()
    mean_p = p.mean(dim=0)
    marginal = -(mean_p * mean_p.log()).sum()
    assert float(loss) == pytest.approx(float(conditional - lam * marginal), rel=1e-5)
    assert float(logs["entropy"]) == pytest.approx(float(conditional), rel=1e-5)
    assert float(logs["marginal_entropy"]) == pytest.approx(float(marginal), rel=1e-5)
    # the diversity term rewards spreading: the same confident prediction everywhere scores worse
    collapsed = torch.tensor([[5.0, 0.0, 0.0]] * 3)
    spread = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    infomax = InfoMax()
    assert float(infomax(TaskOutput(spread), {}, "t")[0]) < float(infomax(TaskOutput(collapsed), {}, "t")[0])
    assert float(Entropy()(TaskOutput(spread), {}, "t")) == pytest.approx(float(Entropy()(TaskOutput(collapsed), {}, "t")))


# ---------------------------------------------------------------------- alignment


def test_kl_to_teacher_by_hand_with_temperature():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    teacher = torch.tensor([[0.0, 1.0, 0.5], [3.0, 0.0, -2.0]])
    T = 3.0
    ps = torch.softmax(student.double() / T, -1)
    pt = torch.softmax(teacher.double() / T, -1)
    expected = T**2 * (pt * (pt.log() - ps.log())).sum(-1).mean()
    assert float(kl_to_teacher(student, teacher, T)) == pytest.approx(float(expected), rel=1e-5)
    assert float(kl_to_teacher(teacher, teacher, T)) == 0.0


def test_alignment_loss_by_hand_kl_and_masked_hidden_mse():
    base, experts, merged = mlp_merge("task", init={"t0": 0.6, "t1": 0.25})
    rows = {"t0": sequence_rows(7, seed=1), "t1": sequence_rows(5, seed=2)}
    tasks = {"t0": MaskedSeqTask("t0"), "t1": MaskedSeqTask("t1")}
    T = 2.0
    objective = ExpertAlignment(
        temperature=T, logits_weight=0.8, hidden_weight=1.5, hidden_layers=[0, 1], task_weights={"t1": 3.0}
    )
    objective.setup(context_for(merged, tasks, rows))

    student_model = explicit_model(base, experts, {"t0": 0.6, "t1": 0.25})
    for name, index in (("t0", [4, 1, 6]), ("t1", [3, 0])):
        batch = collate_rows(rows[name], index, rows_to_batch)
        output = tasks[name](merged, merged.merged_parameters(), batch, objective.hidden_layers)
        loss, logs = objective(output, batch, name)

        x, mask = batch["inputs"], batch["mask"]
        valid = mask.bool()
        s0, s1, s_logits = explicit_hidden(student_model, x)
        t0, t1, t_logits = explicit_hidden(experts[name], x)  # the task's own expert, run directly
        ps = torch.softmax(masked_mean(s_logits, mask).double() / T, -1)
        pt = torch.softmax(masked_mean(t_logits, mask).double() / T, -1)
        kl = T**2 * (pt * (pt.log() - ps.log())).sum(-1).mean()
        mse0 = ((s0[valid] - t0[valid]) ** 2).mean()  # valid tokens only
        mse1 = ((s1[valid] - t1[valid]) ** 2).mean()
        weight = 3.0 if name == "t1" else 1.0
        expected = weight * (0.8 * kl + 1.5 * (mse0 + mse1) / 2)
        assert float(loss) == pytest.approx(float(expected), rel=1e-4), name
        assert float(logs["kl"]) == pytest.approx(float(kl), rel=1e-4)
        assert float(logs["mse0"]) == pytest.approx(float(mse0), rel=1e-4)
        assert float(logs["mse1"]) == pytest.approx(float(mse1), rel=1e-4)
        # counting padded tokens would change the MSE a lot (they are 50x larger inputs)
        unmasked = ((s0 - t0) ** 2).mean()
        assert abs(float(unmasked) - float(mse0)) > 0.1 * float(mse0)


def test_alignment_targets_are_computed_once_in_setup_and_equal_the_expert():
    base, experts, merged = mlp_merge("layer")
    rows = {"t0": sequence_rows(7, seed=3)}
    task = MaskedSeqTask("t0")
    objective = ExpertAlignment(hidden_layers=[1])
    objective.setup(context_for(merged, {"t0": task}, rows, batch_size=3))
    assert task.calls == 3  # ceil(7 / 3) calibration batches, once each
    targets = objective.targets["t0"]
    assert len(targets["logits"]) == 7 and len(targets["hidden1"]) == 7
    for i, row in enumerate(rows["t0"]):
        valid = row["mask"].bool()
        _, h1, logits = explicit_hidden(experts["t0"], row["inputs"].unsqueeze(0))
        torch.testing.assert_close(targets["logits"][i], masked_mean(logits, row["mask"].unsqueeze(0)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(targets["hidden1"][i], h1[0][valid], rtol=1e-5, atol=1e-6)
    # the loss only looks targets up: no further task (expert) call
    batch = collate_rows(rows["t0"], [2, 5], rows_to_batch)
    output = task(merged, merged.merged_parameters(), batch, objective.hidden_layers)
    calls = task.calls
    objective(output, batch, "t0")
    objective(output, batch, "t0")
    assert task.calls == calls


def test_alignment_is_exactly_zero_at_the_experts_own_coefficients():
    base, experts, merged = mlp_merge("task", init={"t0": 1.0, "t1": 0.0})
    rows = {"t0": sequence_rows(6, seed=5)}
    task = MaskedSeqTask("t0")
    objective = ExpertAlignment(temperature=2.0, hidden_layers=[0, 1], l1_weight=0.3)
    objective.setup(context_for(merged, {"t0": task}, rows))
    batch = collate_rows(rows["t0"], [5, 0, 3, 2], rows_to_batch)
    output = task(merged, merged.merged_parameters(), batch, objective.hidden_layers)
    loss, logs = objective(output, batch, "t0")
    assert float(loss) == 0.0
    assert float(logs["mse0"]) == 0.0 and float(logs["mse1"]) == 0.0 and float(logs["kl"]) == 0.0
    assert float(objective.penalty(merged)) == 0.0
    # anywhere else it is positive
    with torch.no_grad():
        merged.coefficients.raw.add_(torch.tensor([[-0.2], [0.1]]))
    output = task(merged, merged.merged_parameters(), batch, objective.hidden_layers)
    assert float(objective(output, batch, "t0")[0]) > 1e-6


def test_alignment_expert_mapping_and_errors():
    base, experts, merged = mlp_merge("task")
    rows = {"x": sequence_rows(4)}
    task = MaskedSeqTask("x")
    with pytest.raises(KeyError, match="task_experts"):
        ExpertKL().setup(context_for(merged, {"x": task}, rows))
    objective = ExpertKL(task_experts={"x": "t1"})
    objective.setup(context_for(merged, {"x": task}, rows))
    row = rows["x"][2]
    logits = explicit_hidden(experts["t1"], row["inputs"].unsqueeze(0))[2]
    torch.testing.assert_close(objective.targets["x"]["logits"][2], masked_mean(logits, row["mask"].unsqueeze(0)))
    assert objective.hidden_layers == ()
    with pytest.raises(RuntimeError, match="before setup"):
        ExpertKL()(TaskOutput(torch.zeros(1, 3)), {"index": torch.tensor([0])}, "x")
    # calibration batches that are not in row order would misalign targets: refused
    shuffled = ObjectiveContext(
        merged, {"x": task}, lambda t: [collate_rows(rows["x"], [1, 0, 2, 3], rows_to_batch)], torch.device("cpu")
    )
    with pytest.raises(ValueError, match="not in row order"):
        ExpertKL(task_experts={"x": "t0"}).setup(shuffled)


def test_l1_drift_is_mean_over_trainable_slots_only():
    # layer-wise: 6 tensors; the last Linear (4.weight, 4.bias) frozen -> 4 trainable slots
    _, _, merged = mlp_merge("layer", init=0.3, freeze=r"^4\.")
    assert merged.layout.num_slots == 6 and len(merged.layout.frozen) == 2
    assert float(coefficient_drift(merged)) == 0.0
    delta = torch.tensor([[0.1, -0.2, 0.3, -0.4], [0.5, 0.0, -0.6, 0.7]])
    with torch.no_grad():
        merged.coefficients.raw.add_(delta)
    expected = delta.abs().sum() / 8  # not / 12: frozen slots do not count
    assert float(coefficient_drift(merged)) == pytest.approx(float(expected), rel=1e-6)
    assert float(L1ToInit().penalty(merged)) == pytest.approx(float(expected), rel=1e-6)
    assert float(ExpertAlignment(l1_weight=0.5).penalty(merged)) == pytest.approx(0.5 * float(expected), rel=1e-6)
    assert ExpertAlignment(l1_weight=0.0).penalty(merged) is None
    # the penalty is differentiable w.r.t. the coefficients: d mean|Δ| / dΔ = sign(Δ) / 8
    L1ToInit().penalty(merged).backward()
    torch.testing.assert_close(merged.coefficients.raw.grad, delta.sign() / 8)


# ---------------------------------------------------------------------- supervised


def test_cross_entropy_by_hand_and_needs_labels():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    loss = CrossEntropy()(TaskOutput(logits, labels=labels), {}, "t")
    log_p = torch.log_softmax(logits.double(), -1)
    assert float(loss) == pytest.approx(float(-(log_p[0, 0] + log_p[1, 2]) / 2), rel=1e-6)
    with pytest.raises(ValueError, match="needs labels.*'sst2'"):
        CrossEntropy()(TaskOutput(logits), {}, "sst2")


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


def test_registry_dotted_paths_class_and_function():
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]])
    out = TaskOutput(logits)
    obj = build_objective("test_objectives:ScaledEntropy", scale=2.0)
    assert isinstance(obj, ScaledEntropy)
    assert float(obj(out, {}, "t")) == pytest.approx(2 * float(hand_entropy(logits).mean()), rel=1e-6)
    assert isinstance(build_objective("test_objectives.ScaledEntropy"), ScaledEntropy)

    fn = build_objective("test_objectives:max_logit_loss", offset=0.5)
    assert isinstance(fn, FunctionObjective)
    assert float(fn(out, {}, "task-a")) == pytest.approx((2.0 + 3.0) / 2 + 0.5)
    assert EXTERNAL_CALLS[-1] == "task-a"
    assert float(build_objective("test_objectives.max_logit_loss")(out, {}, "t")) == pytest.approx(2.5)
    with pytest.raises(KeyError, match="cannot import objective 'no_such_module_xyz:Thing'"):
        build_objective("no_such_module_xyz:Thing")
    with pytest.raises(KeyError, match="cannot import objective 'test_objectives:NoSuchThing'"):
        build_objective("test_objectives:NoSuchThing")


def test_registry_unknown_argument_is_named():
    with pytest.raises(TypeError, match="temprature"):
        build_objective("entropy", temprature=2.0)
    with pytest.raises(TypeError, match="bogus"):
        build_objective("test_objectives:max_logit_loss", bogus=1)
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


def test_weighted_objectives_combine_weights_penalties_and_hidden_layers():
    _, _, merged = mlp_merge("layer", init=0.3)
    rows = {"t0": sequence_rows(5, seed=7)}
    task = MaskedSeqTask("t0")
    align1 = ExpertAlignment(hidden_layers=[1], l1_weight=0.5)
    align0 = ExpertAlignment(hidden_layers=[0], logits_weight=0.0)
    entropy, l1 = Entropy(), L1ToInit()
    combined = WeightedObjectives([(2.0, align1), (0.5, entropy), (3.0, l1), (1.5, align0)], names=["a1", "ent", "l1", "a0"])
    assert combined.hidden_layers == (0, 1)
    combined.setup(context_for(merged, {"t0": task}, rows))
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


def test_kl_to_teacher_is_never_negative_where_float32_rounding_would_make_it_so():
    """Identical distributions over a large vocabulary: the float32 sum of p·(log p − log q)
    rounds to either side of 0; the KL is clamped, so a guarded balance never sees −5e-9."""
    logits = torch.randn(64, 4096, generator=torch.Generator().manual_seed(3)) * 8
    nudged = logits + 1e-7 * torch.randn(64, 4096, generator=torch.Generator().manual_seed(4))
    raw = torch.nn.functional.kl_div(torch.log_softmax(nudged, -1), torch.log_softmax(logits, -1),
                                     log_target=True, reduction="none").sum(-1)
    assert bool((raw < 0).any())  # the rounding this guards against does happen
    assert float(kl_to_teacher(nudged, logits)) >= 0.0
