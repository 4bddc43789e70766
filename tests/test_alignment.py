"""Expert Merging's alignment (adamerge.objectives.alignment) against hand computations: the
temperature-scaled KL (never negative), the masked hidden MSE, targets computed once in setup from
each task's own expert (zero loss at that expert's coefficients), the expert mapping, L1 drift over
trainable slots only, and the top-k KL against the full KL."""

from __future__ import annotations

import pytest
import torch

from adamerge.learning.data import collate_rows, rows_to_batch
from adamerge.objectives import ObjectiveContext
from adamerge.objectives.alignment import (
    ExpertAlignment,
    ExpertKL,
    L1ToInit,
    coefficient_drift,
    kl_to_teacher,
    top_k_kl,
    top_k_targets,
)
from adamerge.tasks.base import TaskOutput


def logits(rows=5, vocab=11, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_with_every_token_kept_it_is_the_full_kl(temperature):
    student, teacher = logits(seed=1), logits(seed=2)
    values, indices = top_k_targets(teacher, k=teacher.shape[-1], temperature=temperature)
    torch.testing.assert_close(top_k_kl(student, values, indices, temperature),
                               kl_to_teacher(student, teacher, temperature), rtol=1e-5, atol=1e-6)


def test_with_k_tokens_it_is_the_kl_of_the_k_tokens_and_one_bucket_for_the_rest():
    student, teacher, k = logits(seed=3), logits(seed=4), 3
    values, indices = top_k_targets(teacher, k)
    assert values.shape == indices.shape == (5, k) and indices.dtype == torch.int32
    p, q = teacher.softmax(-1), student.softmax(-1)
    by_hand = 0.0
    for row in range(5):
        top = p[row].topk(k).indices
        p_coarse = torch.cat([p[row, top], (1 - p[row, top].sum())[None]])
        q_coarse = torch.cat([q[row, top], (1 - q[row, top].sum())[None]])
        by_hand += (p_coarse * (p_coarse.log() - q_coarse.log())).sum() / 5
    torch.testing.assert_close(top_k_kl(student, values, indices), by_hand, rtol=1e-5, atol=1e-6)
    assert top_k_kl(teacher, values, indices) < 1e-6  # the teacher against itself
    assert 0 <= top_k_kl(student, values, indices) <= kl_to_teacher(student, teacher) + 1e-6  # coarse-graining loses information


def test_expert_kl_keeps_k_values_and_indices_per_row(mlp_problem):
    merged, tasks, data = mlp_problem()
    batches = lambda name: [{"inputs": torch.stack([r["inputs"] for r in data[name]]), "index": torch.arange(len(data[name]))}]  # noqa: E731
    objective = ExpertKL(top_k=2)
    objective.setup(ObjectiveContext(merged, tasks, batches, torch.device("cpu")))
    targets = objective.targets["t0"]
    assert [t.shape for t in targets["logits"][:2]] == [(1, 2), (1, 2)] and targets["indices"][0].dtype == torch.int32
    batch = batches("t0")[0]
    loss, logs = objective(tasks["t0"](merged, merged.merged_parameters(), batch), batch, "t0")
    assert loss >= 0 and "kl" in logs
    with pytest.raises(ValueError, match="top_k must be a positive number of tokens"):
        ExpertKL(top_k=0)


def test_kl_to_teacher_by_hand_with_temperature():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    teacher = torch.tensor([[0.0, 1.0, 0.5], [3.0, 0.0, -2.0]])
    T = 3.0
    ps = torch.softmax(student.double() / T, -1)
    pt = torch.softmax(teacher.double() / T, -1)
    expected = T**2 * (pt * (pt.log() - ps.log())).sum(-1).mean()
    assert float(kl_to_teacher(student, teacher, T)) == pytest.approx(float(expected), rel=1e-5)
    assert float(kl_to_teacher(teacher, teacher, T)) == 0.0


def test_alignment_loss_by_hand_kl_and_masked_hidden_mse(kit):
    base, experts, merged = kit.mlp_merge("task", init={"t0": 0.6, "t1": 0.25})
    rows = {"t0": kit.sequence_rows(7, seed=1), "t1": kit.sequence_rows(5, seed=2)}
    tasks = {"t0": kit.sequence_task("t0"), "t1": kit.sequence_task("t1")}
    T = 2.0
    objective = ExpertAlignment(
        temperature=T, logits_weight=0.8, hidden_weight=1.5, hidden_layers=[0, 1], task_weights={"t1": 3.0}
    )
    objective.setup(kit.context_for(merged, tasks, rows))

    student_model = kit.explicit_model(base, experts, {"t0": 0.6, "t1": 0.25})
    for name, index in (("t0", [4, 1, 6]), ("t1", [3, 0])):
        batch = collate_rows(rows[name], index, rows_to_batch)
        output = tasks[name](merged, merged.merged_parameters(), batch, objective.hidden_layers)
        loss, logs = objective(output, batch, name)

        x, mask = batch["inputs"], batch["mask"]
        valid = mask.bool()
        s0, s1, s_logits = kit.explicit_hidden(student_model, x)
        t0, t1, t_logits = kit.explicit_hidden(experts[name], x)  # the task's own expert, run directly
        ps = torch.softmax(kit.masked_mean(s_logits, mask).double() / T, -1)
        pt = torch.softmax(kit.masked_mean(t_logits, mask).double() / T, -1)
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


def test_alignment_targets_are_computed_once_in_setup_and_equal_the_expert(kit):
    base, experts, merged = kit.mlp_merge("layer")
    rows = {"t0": kit.sequence_rows(7, seed=3)}
    task = kit.sequence_task("t0")
    objective = ExpertAlignment(hidden_layers=[1])
    objective.setup(kit.context_for(merged, {"t0": task}, rows, batch_size=3))
    assert task.calls == 3  # ceil(7 / 3) calibration batches, once each
    targets = objective.targets["t0"]
    assert len(targets["logits"]) == 7 and len(targets["hidden1"]) == 7
    for i, row in enumerate(rows["t0"]):
        valid = row["mask"].bool()
        _, h1, logits = kit.explicit_hidden(experts["t0"], row["inputs"].unsqueeze(0))
        torch.testing.assert_close(targets["logits"][i], kit.masked_mean(logits, row["mask"].unsqueeze(0)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(targets["hidden1"][i], h1[0][valid], rtol=1e-5, atol=1e-6)
    # the loss only looks targets up: no further task (expert) call
    batch = collate_rows(rows["t0"], [2, 5], rows_to_batch)
    output = task(merged, merged.merged_parameters(), batch, objective.hidden_layers)
    calls = task.calls
    objective(output, batch, "t0")
    objective(output, batch, "t0")
    assert task.calls == calls


def test_alignment_is_exactly_zero_at_the_experts_own_coefficients(kit):
    base, experts, merged = kit.mlp_merge("task", init={"t0": 1.0, "t1": 0.0})
    rows = {"t0": kit.sequence_rows(6, seed=5)}
    task = kit.sequence_task("t0")
    objective = ExpertAlignment(temperature=2.0, hidden_layers=[0, 1], l1_weight=0.3)
    objective.setup(kit.context_for(merged, {"t0": task}, rows))
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


def test_alignment_expert_mapping_and_errors(kit):
    base, experts, merged = kit.mlp_merge("task")
    rows = {"x": kit.sequence_rows(4)}
    task = kit.sequence_task("x")
    with pytest.raises(KeyError, match="task_experts"):
        ExpertKL().setup(kit.context_for(merged, {"x": task}, rows))
    objective = ExpertKL(task_experts={"x": "t1"})
    objective.setup(kit.context_for(merged, {"x": task}, rows))
    row = rows["x"][2]
    logits = kit.explicit_hidden(experts["t1"], row["inputs"].unsqueeze(0))[2]
    torch.testing.assert_close(objective.targets["x"]["logits"][2], kit.masked_mean(logits, row["mask"].unsqueeze(0)))
    assert objective.hidden_layers == ()
    with pytest.raises(RuntimeError, match="before setup"):
        ExpertKL()(TaskOutput(torch.zeros(1, 3)), {"index": torch.tensor([0])}, "x")
    # calibration batches that are not in row order would misalign targets: refused
    shuffled = ObjectiveContext(
        merged, {"x": task}, lambda t: [collate_rows(rows["x"], [1, 0, 2, 3], rows_to_batch)], torch.device("cpu")
    )
    with pytest.raises(ValueError, match="not in row order"):
        ExpertKL(task_experts={"x": "t0"}).setup(shuffled)


def test_l1_drift_is_mean_over_trainable_slots_only(kit):
    # layer-wise: 6 tensors; the last Linear (4.weight, 4.bias) frozen -> 4 trainable slots
    _, _, merged = kit.mlp_merge("layer", init=0.3, freeze=r"^4\.")
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


def test_kl_to_teacher_is_never_negative_where_float32_rounding_would_make_it_so():
    """Identical distributions over a large vocabulary: the float32 sum of p·(log p − log q)
    rounds to either side of 0; the KL is clamped, so a guarded balance never sees −5e-9."""
    logits = torch.randn(64, 4096, generator=torch.Generator().manual_seed(3)) * 8
    nudged = logits + 1e-7 * torch.randn(64, 4096, generator=torch.Generator().manual_seed(4))
    raw = torch.nn.functional.kl_div(torch.log_softmax(nudged, -1), torch.log_softmax(logits, -1),
                                     log_target=True, reduction="none").sum(-1)
    assert bool((raw < 0).any())  # the rounding this guards against does happen
    assert float(kl_to_teacher(nudged, logits)) >= 0.0
