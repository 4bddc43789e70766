"""The Lightning learner: what it trains, how often it merges, constraints, tiny checkpoints
and bit-exact resume (tiny MLP backbone with per-task heads); selection is in test_selection.py."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from adamerge import Clamp, Sigmoid
from adamerge.learning.data import CalibrationData
from adamerge.learning.learner import CoefficientLearner, frozen_modules_expected
from adamerge.objectives import build_objective
from adamerge.tasks.base import HeadTask

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def mean_entropy(merged, tasks, data) -> float:
    entropy = build_objective("entropy")
    values = []
    with torch.no_grad():
        for name, task in tasks.items():
            batch = {"inputs": torch.stack([r["inputs"] for r in data[name]])}
            values.append(float(entropy(task(merged, merged.merged_parameters(), batch), batch, name)))
    return sum(values) / len(values)


# ---------------------------------------------------------------------- what is trained


def test_a_step_updates_only_the_coefficients(mlp_problem, lightning_fit):
    merged, tasks, data = mlp_problem()
    backbone = {k: v.clone() for k, v in merged.backbone.state_dict().items()}
    vectors = {k: v.clone() for k, v in merged.vectors._buffers.items()}
    heads = {n: {k: v.clone() for k, v in t.head.state_dict().items()} for n, t in tasks.items()}
    before = merged.coefficients().detach().clone()
    learner = CoefficientLearner(merged, tasks, build_objective("entropy"), lr=0.05)
    assert [p for p in learner.parameters() if p.requires_grad] == [merged.coefficients.raw]
    lightning_fit(learner, CalibrationData(data, batch_size=4), max_steps=1)
    after = merged.coefficients().detach()
    assert (after != before).all()  # every (layer, expert) coefficient moved (Adam: by ~lr)
    torch.testing.assert_close((after - before).abs(), torch.full_like(before, 0.05), rtol=1e-3, atol=1e-4)
    for k, v in merged.backbone.state_dict().items():
        assert torch.equal(v, backbone[k]), k
    for k, v in merged.vectors._buffers.items():
        assert torch.equal(v, vectors[k]), k
    for n, t in tasks.items():
        for k, v in t.head.state_dict().items():
            assert torch.equal(v, heads[n][k]), (n, k)


def test_bf16_true_trains_float32_coefficients(mlp_problem, lightning_fit):
    """``bf16-true`` casts the model, not the coefficients: a step of ``lr`` moves them by ``lr``
    (bf16 would round 0.3 ± 1e-3 to its grid, 2^-9 apart there) and Adam's moments are float32."""
    merged, tasks, data = mlp_problem()
    before = merged.coefficients().detach().clone()
    learner = CoefficientLearner(merged, tasks, build_objective("entropy"), lr=1e-3)
    lightning_fit(learner, CalibrationData(data, batch_size=4), max_steps=1, precision="bf16-true")
    assert merged.backbone[0].weight.dtype == torch.bfloat16
    raw = merged.coefficients.raw.detach()
    assert raw.dtype == torch.float32 and (raw.to(torch.bfloat16).float() != raw).any()
    after = merged.coefficients().detach()
    torch.testing.assert_close((after - before).abs(), torch.full_like(before, 1e-3), rtol=1e-3, atol=1e-6)
    moments = learner.trainer.optimizers[0].state[merged.coefficients.raw]
    assert moments["exp_avg"].dtype == moments["exp_avg_sq"].dtype == torch.float32


def test_entropy_minimisation_lowers_the_entropy(mlp_problem, lightning_fit):
    merged, tasks, data = mlp_problem()
    before = mean_entropy(merged, tasks, data)
    learner = CoefficientLearner(merged, tasks, build_objective("entropy"), lr=0.05)
    lightning_fit(learner, CalibrationData(data, batch_size=8), max_steps=30)
    after = mean_entropy(merged, tasks, data)
    assert after < before - 0.05, (before, after)


class Counting(HeadTask):
    def __init__(self, task: HeadTask):
        super().__init__(task.name, task.head, hidden_modules=task.hidden_modules)
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return super().forward(*args, **kwargs)


@pytest.mark.parametrize("objective", ["entropy", "expert_kl"])
def test_one_merge_per_step_and_expert_targets_only_in_setup(mlp_problem, lightning_fit, objective):
    merged, tasks, data = mlp_problem()
    tasks = {n: Counting(t) for n, t in tasks.items()}
    merges = []
    original = merged._merge
    merged._merge = lambda: merges.append(1) or original()
    steps = 7
    learner = CoefficientLearner(merged, tasks, build_objective(objective), lr=0.01)
    data_module = CalibrationData(data, batch_size=4, eval_batch_size=10)
    lightning_fit(learner, data_module, max_steps=steps)
    assert len(merges) == steps  # one merge per step, shared by both tasks
    setup_batches = {"t0": 3, "t1": 2} if objective == "expert_kl" else {"t0": 0, "t1": 0}
    assert {n: t.calls for n, t in tasks.items()} == {n: steps + setup_batches[n] for n in tasks}


def test_task_weights_scale_task_losses(mlp_problem):
    merged, tasks, data = mlp_problem()
    batch = {n: {"inputs": torch.stack([r["inputs"] for r in data[n][:5]]), "index": torch.arange(5)} for n in tasks}
    plain = CoefficientLearner(merged, tasks, build_objective("entropy"))
    total, logs = plain.step_loss(batch)
    weighted = CoefficientLearner(merged, tasks, build_objective("entropy"), task_weights={"t0": 2.5, "t1": 0.0})
    weighted_total, weighted_logs = weighted.step_loss(batch)
    assert float(total) == pytest.approx(float(logs["t0/loss"] + logs["t1/loss"]), rel=1e-6)
    assert float(weighted_total) == pytest.approx(2.5 * float(logs["t0/loss"]), rel=1e-6)
    assert float(weighted_logs["t1/loss"]) == pytest.approx(float(logs["t1/loss"]))  # logs stay unweighted
    with pytest.raises(KeyError, match="unknown task.*'t9'"):
        CoefficientLearner(merged, tasks, build_objective("entropy"), task_weights={"t9": 1.0})
    # a penalty is added once per step, not per task
    l1 = build_objective("l1_to_init")
    with torch.no_grad():
        merged.coefficients.raw.add_(0.2)
    penalised, logs = CoefficientLearner(merged, tasks, l1).step_loss(batch)
    assert float(penalised) == pytest.approx(0.2, rel=1e-5) and float(logs["penalty"]) == pytest.approx(0.2, rel=1e-5)


def test_log_task_balance_weighs_relative_progress(mlp_problem):
    merged, tasks, data = mlp_problem()
    batch = {n: {"inputs": torch.stack([r["inputs"] for r in data[n][:5]]), "index": torch.arange(5)} for n in tasks}
    summed = CoefficientLearner(merged, tasks, build_objective("entropy"))
    total, logs = summed.step_loss(batch)
    balanced = CoefficientLearner(merged, tasks, build_objective("entropy"), task_balance="log")
    log_total, _ = balanced.step_loss(batch)
    expected = sum(torch.log(logs[f"{n}/loss"] + 1e-6) for n in tasks)
    assert float(log_total) == pytest.approx(float(expected), rel=1e-6)
    # the gradient is each task's gradient divided by its own loss
    grads = {}
    for name in tasks:
        merged.coefficients.raw.grad = None
        single = {name: batch[name]}
        loss, _ = summed.step_loss(single)
        loss.backward()
        grads[name] = merged.coefficients.raw.grad.clone() / (float(loss) + 1e-6)
    merged.coefficients.raw.grad = None
    balanced.step_loss(batch)[0].backward()
    torch.testing.assert_close(merged.coefficients.raw.grad, grads["t0"] + grads["t1"], rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="unknown task balance 'max'; use one of"):
        CoefficientLearner(merged, tasks, build_objective("entropy"), task_balance="max")
    with pytest.raises(ValueError, match="non-negative"):
        CoefficientLearner(merged, tasks, build_objective("infomax", diversity_weight=10.0), task_balance="log").step_loss(batch)


def test_initial_task_balance_divides_by_each_task_starting_loss(mlp_problem, lightning_fit, checkpointing, tmp_path):
    merged, tasks, data = mlp_problem()
    calibration = CalibrationData(data, batch_size=4)
    learner = CoefficientLearner(merged, tasks, build_objective("entropy"), task_balance="initial")
    # the starting losses: each task's mean entropy over its calibration batches, before any step
    expected = {}
    with torch.no_grad():
        for name, task in tasks.items():
            values = [float(learner.objective(task(merged, merged.merged_parameters(), b), b, name))
                      for b in calibration.calibration_batches(name)]
            expected[name] = sum(values) / len(values)
    lightning_fit(learner, calibration, max_steps=1)
    assert learner.loss.initial == pytest.approx(expected, rel=1e-6)
    batch = {n: {"inputs": torch.stack([r["inputs"] for r in data[n][:5]]), "index": torch.arange(5)} for n in tasks}
    total, logs = learner.step_loss(batch)
    assert float(total) == pytest.approx(sum(float(logs[f"{n}/loss"]) / expected[n] for n in tasks), rel=1e-6)
    # the references travel with checkpoints, so a resumed run divides by the same numbers
    folder = tmp_path / "ckpt"
    resumed_from = CoefficientLearner(merged, tasks, build_objective("entropy"), task_balance="initial")
    lightning_fit(resumed_from, CalibrationData(data, batch_size=4), max_steps=2, callbacks=[checkpointing(folder, 2)])
    fresh = CoefficientLearner(copy.deepcopy(merged), tasks, build_objective("entropy"), task_balance="initial")
    fresh.on_load_checkpoint(torch.load(folder / "last.ckpt", weights_only=False))
    assert fresh.loss.initial == resumed_from.loss.initial


def test_guarded_task_balance_pulls_harder_on_tasks_behind_their_start(mlp_problem):
    merged, tasks, data = mlp_problem()
    learner = CoefficientLearner(merged, tasks, build_objective("entropy"), task_balance="guarded", guard_weight=3.0)
    batch = {n: {"inputs": torch.stack([r["inputs"] for r in data[n][:5]]), "index": torch.arange(5)} for n in tasks}
    _, logs = CoefficientLearner(merged, tasks, build_objective("entropy")).step_loss(batch)
    t0, t1 = float(logs["t0/loss"]), float(logs["t1/loss"])
    learner.loss.initial = {"t0": t0 - 0.1, "t1": t1 + 0.1}  # t0 has fallen behind its start, t1 has not
    total, _ = learner.step_loss(batch)
    assert float(total) == pytest.approx(t0 + 3.0 * 0.1 + t1, rel=1e-5)


def test_per_task_backward_applies_the_loss_scaler_and_injects_unscaled_gradients(mlp_problem):
    """A trainer with a GradScaler (``16-mixed``): the per-task backwards, outside Lightning's
    precision plugin, run scaled (fp16 gradients would underflow otherwise), and the coefficients
    get the joint backward's gradients once Lightning's own scaling of the loss is undone."""
    merged, tasks, data = mlp_problem()
    batch = {n: {"inputs": torch.stack([r["inputs"] for r in data[n][:5]]), "index": torch.arange(5)} for n in tasks}
    scale = 2.0**10
    seen = []  # the gradient reaching task t0's logits, per backward

    def record_gradient(module, args, out):
        out.register_hook(lambda grad: seen.append(grad.clone()))

    tasks["t0"].head.register_forward_hook(record_gradient)
    grads = {}
    for per_task, scaler in [(False, None), (True, None), (False, scale), (True, scale)]:
        learner = CoefficientLearner(merged, tasks, build_objective("entropy"), per_task_backward=per_task)
        if scaler is not None:  # Lightning's backward: the returned loss scaled, then unscaled gradients
            scaler = torch.amp.GradScaler("cpu", init_scale=scale)
            learner.trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler))
        merged.coefficients.raw.grad = None
        loss, _ = learner.step_loss(batch)
        (loss if scaler is None else scaler.scale(loss)).backward()
        grads[per_task, scaler is not None] = merged.coefficients.raw.grad / (1.0 if scaler is None else scale)
    plain, split, plain_scaled, split_scaled = seen
    assert torch.equal(split_scaled, split * scale) and torch.equal(plain_scaled, plain * scale)
    assert grads[False, False].abs().min() > 0
    for key, grad in grads.items():
        torch.testing.assert_close(grad, grads[False, False], rtol=1e-5, atol=1e-8, msg=str(key))


@pytest.mark.parametrize("constraint", [Clamp(0.2, 0.4), Sigmoid(0.1, 0.5)], ids=["clamp", "sigmoid"])
def test_constraints_hold_after_steps(mlp_problem, lightning_fit, constraint):
    merged, tasks, data = mlp_problem(constraint=constraint)
    learner = CoefficientLearner(merged, tasks, build_objective("entropy"), lr=0.5)
    lightning_fit(learner, CalibrationData(data, batch_size=4), max_steps=6)
    values = merged.coefficients().detach()
    assert (values >= constraint.lo).all() and (values <= constraint.hi).all()
    if isinstance(constraint, Clamp):
        raw = merged.coefficients.raw.detach()
        assert (raw >= 0.2).all() and (raw <= 0.4).all()  # projected, not merely clamped in the forward
        assert ((raw == 0.2) | (raw == 0.4)).any()  # the bound was actually hit
    else:
        assert (values - 0.3).abs().max() > 0.05  # the coefficients did move


# ---------------------------------------------------------------------- checkpoints and resume


def test_checkpoints_hold_only_coefficients(mlp_problem, lightning_fit, checkpointing, tmp_path):
    merged, tasks, data = mlp_problem(width=2048)
    learner = CoefficientLearner(merged, tasks, build_objective("entropy"), lr=0.01)
    lightning_fit(learner, CalibrationData(data, batch_size=4), 4, [checkpointing(tmp_path, 2)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # save_top_k=0, as the runner's
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    keys = set(checkpoint["state_dict"])
    assert "merged.coefficients.raw" in keys
    assert keys <= {f"merged.coefficients.{k}" for k in ("raw", "residual", "fixed", "initial")}
    torch.testing.assert_close(checkpoint["state_dict"]["merged.coefficients.raw"], merged.coefficients.raw.detach())
    (state,) = checkpoint["optimizer_states"]
    assert state["state"][0]["exp_avg"].shape == merged.coefficients.raw.shape
    inputs_bytes = sum(t.numel() * t.element_size() for t in merged.state_dict(keep_vars=True).values())
    inputs_bytes += sum(t.numel() * t.element_size() for t in merged.vectors._buffers.values())
    size = (tmp_path / "last.ckpt").stat().st_size
    assert inputs_bytes > 200_000 and size < 16_000, (inputs_bytes, size)
    # a checkpoint without the coefficients (another recipe's) is refused
    del checkpoint["state_dict"]["merged.coefficients.raw"]
    torch.save(checkpoint, tmp_path / "broken.ckpt")
    merged, tasks, data = mlp_problem(width=2048)
    with pytest.raises(KeyError, match="lacks coefficient"):
        lightning_fit(CoefficientLearner(merged, tasks, build_objective("entropy")), CalibrationData(data, batch_size=4), 6,
            ckpt_path=tmp_path / "broken.ckpt")


@pytest.mark.parametrize("interrupt_at", [5, 6])  # mid-epoch, and at the epoch boundary (24 rows / 4)
def test_interrupted_and_resumed_run_is_bit_identical(mlp_problem, lightning_fit, checkpointing, tmp_path, interrupt_at):
    def entropy_run(steps, callbacks=(), ckpt_path=None):
        merged, tasks, data = mlp_problem()
        L.seed_everything(0, verbose=False)
        learner = CoefficientLearner(merged, tasks, build_objective("entropy"), lr=0.05)
        lightning_fit(learner, CalibrationData(data, batch_size=4, seed=3), steps, callbacks, ckpt_path)
        return merged.coefficients.raw.detach().clone()

    uninterrupted = entropy_run(14)
    partial = entropy_run(interrupt_at, [checkpointing(tmp_path, interrupt_at)])
    assert not torch.equal(partial, uninterrupted)
    resumed = entropy_run(14, ckpt_path=tmp_path / "last.ckpt")  # everything rebuilt from scratch
    assert torch.equal(resumed, uninterrupted)


# ---------------------------------------------------------------------- warnings


EVAL_MODE = "Found 3 module(s) in eval mode at the start of training."


def test_importing_the_learner_adds_no_warning_filter_and_fit_silences_only_its_own():
    code = (
        "import warnings; import adamerge.learning.learner; "
        f"print(any(f[1] is not None and f[1].search({EVAL_MODE!r}) for f in warnings.filters))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with frozen_modules_expected():
            warnings.warn(EVAL_MODE)
            warnings.warn("another warning")
        warnings.warn(EVAL_MODE)
    assert [str(w.message) for w in seen] == ["another warning", EVAL_MODE]
