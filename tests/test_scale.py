"""A cross-cutting suite (core/merged, core/task_vectors, learning/learner): what speed and scale
change must not change the results: the merge cut into blocks, task vectors offloaded (kept on
the CPU, or memory-mapped) while the model moves, and the per-task backward that frees each
task's activations before the next task runs."""

from __future__ import annotations

import copy
import warnings

import lightning as L
import pytest
import torch
from torch import nn

from adamerge import MergedModel, TaskVectors
from adamerge.learning.data import CalibrationData
from adamerge.learning.learner import CoefficientLearner
from adamerge.core.merged import merge_blocks
from adamerge.objectives import build_objective
from adamerge.tasks.base import HeadTask
from fixtures.families import perturbed

# ---------------------------------------------------------------------- blocks


def test_merge_blocks_cover_every_chunk_and_respect_the_block_size():
    # 7 rows of 3 entries in 3 chunks (3, 2, 2 rows), blocks of at most 4 entries
    assert merge_blocks(7, 21, (5, 6, 7), block=4) == [
        (0, 4, 5), (4, 8, 5), (8, 9, 5), (9, 13, 6), (13, 15, 6), (15, 19, 7), (19, 21, 7)
    ]
    assert merge_blocks(1, 1, (0,)) == [(0, 1, 0)]  # a 0-d tensor: one row of one entry
    assert merge_blocks(0, 0, (0,)) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["layer", "chunk"])
def test_small_blocks_give_the_same_merge_and_gradients(bert, dtype, granularity):
    tv = TaskVectors.from_models(bert.pretrained, bert.experts, dtype=dtype)
    chunks = {k: v for k, v in bert.chunks.items() if v != 0} if granularity == "chunk" else None
    whole = MergedModel(bert.fresh(), tv, granularity, init=0.4, chunks=chunks)
    blocked = MergedModel(bert.fresh(), tv, granularity, init=0.4, chunks=chunks)
    layout = blocked.layout
    blocked._blocks = [merge_blocks(layout.rows[k], layout.numels[k], layout.tensor_slots[k], block=37) for k in blocked.keys]
    assert sum(len(b) for b in blocked._blocks) > 3 * sum(len(b) for b in whole._blocks)
    for model in (whole, blocked):
        bert.run(model).square().mean().backward()
    expected, got = whole.merged_parameters(), blocked.merged_parameters()
    for key in whole.keys:  # the same sums, element by element
        assert torch.equal(got[key], expected[key]), key
    torch.testing.assert_close(blocked.coefficients.raw.grad, whole.coefficients.raw.grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------- offloaded task vectors


def test_offloaded_task_vectors_stay_put_when_the_model_moves(mlp):
    tv = TaskVectors.from_models(mlp.pretrained, mlp.experts, dtype=torch.bfloat16)
    resident = MergedModel(mlp.fresh(), tv, "layer", init=0.3).to(torch.float64)
    offloaded = MergedModel(mlp.fresh(), tv, "layer", init=0.3, offload_vectors=True).to(torch.float64)
    assert resident.task_vector("0.weight").dtype == torch.float64
    assert offloaded.task_vector("0.weight").dtype == torch.bfloat16  # not converted, not copied
    assert offloaded.task_vector("0.weight").data_ptr() == tv["0.weight"].data_ptr()
    assert offloaded.coefficients.raw.dtype == torch.float32  # coefficients keep their dtype
    x = mlp.args[0].double()
    for model in (resident, offloaded):
        model(x).sum().backward()
    for key, value in offloaded.merged_parameters().items():
        assert torch.equal(value, resident.merged_parameters()[key]), key
    assert torch.equal(offloaded.coefficients.raw.grad, resident.coefficients.raw.grad)
    expert = offloaded.expert_parameters("e1")
    assert torch.equal(expert["0.weight"], resident.expert_parameters("e1")["0.weight"])


def test_memory_mapped_task_vectors_are_merged_in_place(mlp, tmp_path):
    TaskVectors.from_models(mlp.pretrained, mlp.experts).save(tmp_path / "tv.safetensors")
    mapped = TaskVectors.load(tmp_path / "tv.safetensors")
    merged = MergedModel(mlp.fresh(), mapped, "layer", init=0.3, offload_vectors=True)
    assert all(merged.task_vector(k).data_ptr() == mapped[k].data_ptr() for k in merged.keys)
    reference = MergedModel(mlp.fresh(), TaskVectors.from_models(mlp.pretrained, mlp.experts), "layer", init=0.3)
    with torch.no_grad():
        assert torch.equal(merged(*mlp.args), reference(*mlp.args))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offloaded_task_vectors_stream_to_the_accelerator(mlp):
    tv = TaskVectors.from_models(mlp.pretrained, mlp.experts)
    offloaded = MergedModel(mlp.fresh(), tv, "layer", init=0.3, offload_vectors=True).cuda()
    reference = MergedModel(mlp.fresh(), tv, "layer", init=0.3)
    assert offloaded.task_vector("0.weight").device.type == "cpu"
    offloaded(mlp.args[0].cuda()).sum().backward()
    reference(*mlp.args).sum().backward()
    torch.testing.assert_close(offloaded.coefficients.raw.grad.cpu(), reference.coefficients.raw.grad)


# ---------------------------------------------------------------------- per-task backward


def make_problem(tasks=("t0", "t1", "t2")):
    """Backbone 6 -> 16 -> 8, one expert per task (seeded noise), a frozen 8 -> 4 head per task."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8)).eval()
    experts = {name: perturbed(base, seed=10 + k, scale=0.5) for k, name in enumerate(tasks)}
    heads, data = {}, {}
    for k, name in enumerate(tasks):
        torch.manual_seed(100 + k)
        heads[name] = HeadTask(name, nn.Linear(8, 4), hidden_modules=["1"])
        generator = torch.Generator().manual_seed(200 + k)
        data[name] = [{"inputs": torch.randn(6, generator=generator)} for _ in range(12)]
    merged = MergedModel(copy.deepcopy(base), TaskVectors.from_models(base, experts), "layer", init=0.3)
    return merged, heads, data


@pytest.mark.parametrize("balance", ["sum", "log"])
def test_per_task_backward_gives_the_joint_loss_and_gradients(balance):
    grads, losses = [], []
    for per_task in (False, True):
        merged, tasks, data = make_problem()
        learner = CoefficientLearner(merged, tasks, build_objective("entropy"), task_balance=balance,
                                     task_weights={"t1": 2.5}, per_task_backward=per_task)
        batch = {n: {"inputs": torch.stack([r["inputs"] for r in rows[:5]])} for n, rows in data.items()}
        loss, logs = learner.step_loss(batch)
        assert set(logs) == {f"{n}/loss" for n in tasks}
        (3.0 * loss).backward()  # an outer factor (as a loss scaler would apply) reaches the coefficients
        losses.append(loss.detach())
        grads.append(merged.coefficients.raw.grad)
    assert grads[0].abs().min() > 0
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-8)


def test_per_task_backward_trains_like_the_joint_backward_through_lightning():
    """Alignment with hidden states and an L1 penalty: targets from setup, a penalty outside the tasks."""
    results = []
    for per_task in (False, True):
        merged, tasks, data = make_problem()
        objective = build_objective("alignment", hidden_layers=[0], l1_weight=0.1)
        learner = CoefficientLearner(merged, tasks, objective, lr=0.05, per_task_backward=per_task)
        trainer = L.Trainer(max_steps=5, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(learner, datamodule=CalibrationData(data, batch_size=4))
        results.append(merged.coefficients().detach())
    assert not torch.allclose(results[0], torch.full_like(results[0], 0.3))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-6)
