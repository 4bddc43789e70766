"""FW-Merging: the LMO against a hand computation, the step schedule, starts, a synthetic zoo
with an irrelevant and a conflicting member, pool validation, lazy pools, and a recipe run."""

from __future__ import annotations

import copy
import json
import math
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

from adamerge import MergedModel, TaskVectors, methods
from adamerge.io.checkpoints import LazySafetensors, save_safetensors
from adamerge.app.config import ProblemConfig, RecipeError, load_recipe
from adamerge.learning.data import CalibrationData
from adamerge.learning.frank_wolfe import frank_wolfe_merge, schedule
from adamerge.objectives import build_objective
from adamerge.objectives.entropy import prediction_entropy
from adamerge.app.problems import register_problem
from adamerge.app.problems.problem import MergeProblem
from adamerge.app import learners
from adamerge.app.runner import fit
from adamerge.tasks.base import HeadTask
from fixtures.families import make_mlp, perturbed

# ---------------------------------------------------------------------- a random MLP pool


def mlp_setup(members: int = 3):
    pretrained = make_mlp()
    pool = {f"e{k}": perturbed(pretrained, seed=40 + k, scale=0.3) for k in range(members)}
    rows = [{"inputs": torch.randn(6, generator=torch.Generator().manual_seed(i))} for i in range(32)]
    return pretrained, pool, {"t": HeadTask("t")}, CalibrationData({"t": rows}, batch_size=8)


def direct_gradient(pretrained, data, batches: int) -> dict[str, torch.Tensor]:
    """∇ of the mean entropy over the first calibration steps, written without adamerge's loop."""
    params = {k: p.detach().clone().requires_grad_() for k, p in pretrained.named_parameters()}
    stream = iter(data.train_dataloader())
    loss = sum(prediction_entropy(functional_call(pretrained, params, (next(stream)["t"]["inputs"],))).mean() for _ in range(batches))
    (loss / batches).backward()
    return {k: p.grad for k, p in params.items()}


def test_hard_step_from_pretrained_moves_exactly_to_the_lmo_choice():
    pretrained, pool, tasks, data = mlp_setup()
    g = direct_gradient(pretrained, data, batches=2)
    theta0 = pretrained.state_dict()
    scores = {
        name: sum(float((g[k] * (m.state_dict()[k] - theta0[k])).sum()) for k in g) for name, m in pool.items()
    }
    raw = {name: sum(float((g[k] * m.state_dict()[k]).sum()) for k in g) for name, m in pool.items()}
    best = min(scores, key=scores.get)
    assert best == min(raw, key=raw.get)  # <g, θ_k> and <g, θ_k − θ_t> rank alike

    backbone = copy.deepcopy(pretrained)
    result = frank_wolfe_merge(backbone, pool, tasks, data, build_objective("entropy"), iterations=1, batches_per_iteration=2)
    record = result.history[0]
    assert record["chosen"] == best and record["gamma"] == 1.0
    assert record["scores"] == pytest.approx(scores, rel=1e-4, abs=1e-6)
    for key, tensor in result.merged_parameters().items():
        assert torch.equal(tensor, pool[best].state_dict()[key])
    assert record["objective_after"] < record["objective_before"]


def test_tensor_lmo_picks_a_member_per_tensor():
    pretrained, pool, tasks, data = mlp_setup(members=4)
    g = direct_gradient(pretrained, data, batches=1)
    theta0 = pretrained.state_dict()
    expected = {
        key: min(pool, key=lambda n: float((g[key] * (pool[n].state_dict()[key] - theta0[key])).sum())) for key in g
    }
    assert len(set(expected.values())) > 1  # the test means something only if tensors disagree

    result = frank_wolfe_merge(
        copy.deepcopy(pretrained), pool, tasks, data, build_objective("entropy"), iterations=1, lmo="tensor",
        batches_per_iteration=1,
    )
    assert result.history[0]["chosen"] == expected
    for key, tensor in result.merged_parameters().items():
        assert torch.equal(tensor, pool[expected[key]].state_dict()[key])


def test_step_schedule():
    assert [schedule(t) for t in range(4)] == [1.0, 2 / 3, 0.5, 0.4]
    assert schedule(3, step_size=0.5) == pytest.approx(0.2)
    pretrained, pool, tasks, data = mlp_setup()
    result = frank_wolfe_merge(
        copy.deepcopy(pretrained), pool, tasks, data, build_objective("entropy"), iterations=3, step_size=0.5,
        batches_per_iteration=1,
    )
    assert [r["gamma"] for r in result.history] == pytest.approx([0.5, 1 / 3, 0.25])
    with pytest.raises(ValueError, match="step_size"):
        frank_wolfe_merge(copy.deepcopy(pretrained), pool, tasks, data, build_objective("entropy"), step_size=1.5)


def test_starts_task_arithmetic_and_earlier_coefficients(tmp_path):
    pretrained, pool, tasks, data = mlp_setup()
    objective = build_objective("entropy")
    arithmetic = methods.task_arithmetic(pretrained, pool, scaling=0.4).state_dict()
    result = frank_wolfe_merge(
        copy.deepcopy(pretrained), pool, tasks, data, objective, iterations=0, start="task_arithmetic", start_scaling=0.4
    )
    for key, tensor in result.merged_parameters().items():
        torch.testing.assert_close(tensor, arithmetic[key])

    merged = MergedModel(copy.deepcopy(pretrained), TaskVectors.from_models(pretrained, pool), granularity="chunk",
                         chunks={"0.weight": 3}, init=0.2)
    with torch.no_grad():
        merged.coefficients.raw.uniform_(-0.5, 1.0, generator=torch.Generator().manual_seed(0))
    merged.coefficients.save(tmp_path / "coefficients.safetensors")
    result = frank_wolfe_merge(
        copy.deepcopy(pretrained), pool, tasks, data, objective, iterations=0, start=str(tmp_path / "coefficients.safetensors")
    )
    expected = merged.merged_parameters()
    for key, tensor in result.merged_parameters().items():
        torch.testing.assert_close(tensor, expected[key])


def test_task_arithmetic_start_is_theta0_plus_lambda_sum_of_task_vectors():
    pretrained, pool, tasks, data = mlp_setup()
    theta0 = {k: p.detach().clone() for k, p in pretrained.named_parameters()}
    members = {name: dict(m.named_parameters()) for name, m in pool.items()}
    result = frank_wolfe_merge(
        copy.deepcopy(pretrained), pool, tasks, data, build_objective("entropy"), iterations=0, start="task_arithmetic",
        start_scaling=0.35,
    )
    merged = result.merged_parameters()
    assert set(merged) == set(theta0)
    for key, base in theta0.items():
        expected = base + 0.35 * sum(members[name][key].detach() - base for name in members)
        torch.testing.assert_close(merged[key], expected, rtol=1e-6, atol=1e-7)


@torch.no_grad()
def _entropy_at(pretrained, inputs) -> float:
    return float(prediction_entropy(pretrained(inputs)).mean())


@pytest.mark.parametrize("balance", ["log", "initial"])
def test_task_balance_applies_to_the_frank_wolfe_objective(balance):
    pretrained, pool, tasks, data = mlp_setup()
    first = next(iter(data.train_dataloader()))
    loss = _entropy_at(pretrained, first["t"]["inputs"])
    start = [_entropy_at(pretrained, b["inputs"]) for b in data.calibration_batches("t")]  # all 32 rows: one batch
    expected = math.log(loss + 1e-6) if balance == "log" else loss / (sum(start) / len(start))
    result = frank_wolfe_merge(
        copy.deepcopy(pretrained), pool, tasks, data, build_objective("entropy"), iterations=1, batches_per_iteration=1,
        task_balance=balance,
    )
    assert result.history[0]["objective_before"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="unknown task balance 'max'"):
        frank_wolfe_merge(copy.deepcopy(pretrained), pool, tasks, data, build_objective("entropy"), task_balance="max")


def test_frank_wolfe_with_selection_is_refused_naming_the_key():
    recipe = {"problem": {"kind": "hf_sequence_classification", "pretrained": "/nonexistent/model"},
              "frank_wolfe": {}, "selection": {}}
    with pytest.raises(RecipeError, match="`frank_wolfe`.*no `selection`"):
        load_recipe(recipe)
    load_recipe({**recipe, "selection": None, "task_balance": "guarded"})  # a task balance is honoured, not refused


def test_a_frank_wolfe_recipe_passes_its_task_balance(tmp_path, monkeypatch):
    seen = {}

    def capture(*args, **kwargs):
        seen.update(kwargs)
        raise InterruptedError

    monkeypatch.setattr(learners, "frank_wolfe_merge", capture)
    recipe = load_recipe({
        "name": "fw", "output_dir": str(tmp_path / "run"), "task_balance": "guarded", "guard_weight": 2.5,
        "problem": {"kind": "test_frank_wolfe_zoo", "options": {"zoo_dir": str(tmp_path)}},
        "objectives": [{"name": "cross_entropy"}], "frank_wolfe": {"iterations": 1},
    })
    with pytest.raises(InterruptedError):
        fit(recipe)
    assert seen["task_balance"] == "guarded" and seen["guard_weight"] == 2.5


# ---------------------------------------------------------------------- a synthetic zoo

D_TASK, D_FEATURES, CLASSES = 4, 8, 3


def build_zoo(seed: int = 0):
    """Two tasks reading disjoint input blocks; expert a/b each solve their own task (labels are
    their predictions), ``irrelevant`` was tuned on a third block no task reads, ``decoy``
    undoes a and b. Task arithmetic over all four cancels a and b out."""
    g = torch.Generator().manual_seed(seed)
    pretrained = nn.Sequential(nn.Linear(3 * D_TASK, D_FEATURES))
    with torch.no_grad():
        pretrained[0].weight.copy_(0.1 * torch.randn(D_FEATURES, 3 * D_TASK, generator=g))
        pretrained[0].bias.copy_(0.1 * torch.randn(D_FEATURES, generator=g))

    def vector(block: int) -> torch.Tensor:
        tau = torch.zeros(D_FEATURES, 3 * D_TASK)
        tau[:, block * D_TASK : (block + 1) * D_TASK] = 2.0 * torch.randn(D_FEATURES, D_TASK, generator=g)
        return tau

    def expert(tau: torch.Tensor) -> nn.Module:
        model = copy.deepcopy(pretrained)
        with torch.no_grad():
            model[0].weight.add_(tau)
        return model

    tau_a, tau_b, tau_c = vector(0), vector(1), vector(2)
    pool = {"a": expert(tau_a), "b": expert(tau_b), "irrelevant": expert(tau_c), "decoy": expert(-tau_a - tau_b)}
    heads = {name: nn.Linear(D_FEATURES, CLASSES) for name in ("a", "b")}
    with torch.no_grad():
        for head in heads.values():
            head.weight.copy_(torch.randn(CLASSES, D_FEATURES, generator=g) / D_FEATURES**0.5)
            head.bias.zero_()
    tasks = {name: HeadTask(name, head) for name, head in heads.items()}
    splits = {}
    for block, name in enumerate(("a", "b")):
        inputs = torch.zeros(192, 3 * D_TASK)
        inputs[:, block * D_TASK : (block + 1) * D_TASK] = torch.randn(192, D_TASK, generator=g)
        with torch.no_grad():
            labels = heads[name](pool[name](inputs)).argmax(dim=1)
        rows = [{"inputs": x, "label": y} for x, y in zip(inputs, labels)]
        splits[name] = (rows[:96], rows[96:])
    return pretrained, pool, tasks, splits


def zoo_data(splits, batch_size: int = 32) -> CalibrationData:
    return CalibrationData(
        {n: s[0] for n, s in splits.items()}, batch_size=batch_size, evaluation={n: s[1] for n, s in splits.items()}
    )


@torch.no_grad()
def zoo_scores(module: nn.Module, tasks, splits) -> tuple[float, float]:
    """(mean cross-entropy on the calibration rows, mean accuracy on the evaluation rows)."""

    def logits_and_labels(name, rows):
        x, y = torch.stack([r["inputs"] for r in rows]), torch.stack([r["label"] for r in rows])
        return tasks[name].head(module(x)), y

    losses, accuracies = [], []
    for name, (calibration, evaluation) in splits.items():
        losses.append(float(nn.functional.cross_entropy(*logits_and_labels(name, calibration))))
        logits, labels = logits_and_labels(name, evaluation)
        accuracies.append(float((logits.argmax(dim=1) == labels).float().mean()))
    return sum(losses) / len(losses), sum(accuracies) / len(accuracies)


def chosen_names(chosen) -> set[str]:
    """The members a history record chose: a name, a list of names, or per tensor one of those."""
    if isinstance(chosen, str):
        return {chosen}
    if isinstance(chosen, list):
        return set(chosen)
    return set().union(*(chosen_names(c) for c in chosen.values()))


@pytest.mark.parametrize(
    "options",
    [
        {"mode": "hard", "iterations": 8},
        {"mode": "hard", "iterations": 8, "lmo": "tensor"},
        {"mode": "soft", "iterations": 2, "directions": 2, "inner_steps": 25, "inner_lr": 0.05},
        {"mode": "soft", "iterations": 2, "lmo": "tensor", "inner_steps": 25, "inner_lr": 0.05},
    ],
    ids=["hard", "hard-tensor", "soft", "soft-tensor"],
)
def test_zoo_fw_beats_task_arithmetic_and_ignores_the_decoys(options):
    pretrained, pool, tasks, splits = build_zoo()
    arithmetic = zoo_scores(methods.task_arithmetic(pretrained, pool, scaling=0.3), tasks, splits)
    start = zoo_scores(pretrained, tasks, splits)
    result = frank_wolfe_merge(
        copy.deepcopy(pretrained), pool, tasks, zoo_data(splits), build_objective("cross_entropy"), **options
    )
    merged = zoo_scores(result.model.backbone, tasks, splits)
    assert merged[0] < start[0] and merged[0] < arithmetic[0]
    assert merged[1] > arithmetic[1] + 0.2
    history = result.history
    assert history[-1]["objective_after"] < history[0]["objective_before"]
    for record in history:
        assert chosen_names(record["chosen"]) <= {"a", "b"}, record


# ---------------------------------------------------------------------- the pool


def test_pool_errors_name_the_member_and_the_key():
    pretrained, pool, tasks, data = mlp_setup()
    objective = build_objective("entropy")

    def run(member: dict):
        return frank_wolfe_merge(copy.deepcopy(pretrained), {**pool, "bad": member}, tasks, data, objective)

    state = {k: v.clone() for k, v in pretrained.state_dict().items()}
    with pytest.raises(KeyError, match=r"'bad' is missing .*'2\.weight'"):
        run({k: v for k, v in state.items() if k != "2.weight"})
    with pytest.raises(KeyError, match=r"'bad' has key 'extra\.weight'"):
        run({**state, "extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"shape mismatch for '4\.bias': pool member 'bad'"):
        run({**state, "4.bias": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"dtype mismatch for '0\.weight': pool member 'bad' is torch\.int64"):
        run({**state, "0.weight": state["0.weight"].long()})
    with pytest.raises(ValueError, match=r"'bad' has non-finite values .*'0\.bias'"):
        run({**state, "0.bias": torch.full_like(state["0.bias"], float("nan"))})
    with pytest.raises(ValueError, match="precomputes targets"):
        frank_wolfe_merge(copy.deepcopy(pretrained), pool, tasks, data, build_objective("expert_kl"))


def test_safetensors_pool_is_read_lazily_one_tensor_at_a_time(tmp_path, monkeypatch):
    pretrained, pool, tasks, data = mlp_setup()
    files = {}
    for name, module in pool.items():
        files[name] = tmp_path / f"{name}.safetensors"
        save_safetensors(module.state_dict(), files[name])
    live, peak, reads = [0], [0], [0]
    original = LazySafetensors.__getitem__

    def counting(self, key):
        tensor = original(self, key)
        live[0] += 1
        reads[0] += 1
        peak[0] = max(peak[0], live[0])
        weakref.finalize(tensor, lambda: live.__setitem__(0, live[0] - 1))
        return tensor

    monkeypatch.setattr(LazySafetensors, "__getitem__", counting)
    result = frank_wolfe_merge(
        copy.deepcopy(pretrained), files, tasks, data, build_objective("entropy"), iterations=2,
        start="task_arithmetic", batches_per_iteration=1,
    )
    tensors = len(result.keys)
    # validation, the start, two scoring passes and two steps read each member tensor a few times ...
    assert reads[0] >= 4 * len(files) * tensors
    # ... but never more than two pool tensors were alive at once (of 3 members x 6 tensors)
    assert peak[0] <= 2
    for key, tensor in result.merged_parameters().items():
        assert torch.isfinite(tensor).all()


# ---------------------------------------------------------------------- through a recipe


@register_problem("test_frank_wolfe_zoo")
def build_problem(config: ProblemConfig) -> MergeProblem:
    """The synthetic zoo as a recipe problem, its experts saved as safetensors files in ``options.zoo_dir``."""
    pretrained, pool, tasks, splits = build_zoo(config.seed)
    folder = Path(config.options["zoo_dir"])
    experts = {}
    for name, module in pool.items():
        experts[name] = str(folder / f"{name}.safetensors")
        save_safetensors(module.state_dict(), experts[name])
    return MergeProblem(
        pretrained=pretrained,
        experts=experts,
        tasks=tasks,
        calibration={n: s[0] for n, s in splits.items()},
        evaluation={n: s[1] for n, s in splits.items()},
        description={"kind": "test_frank_wolfe_zoo", "experts": experts},
    )


@pytest.mark.parametrize(
    "section", [{"iterations": 4, "lmo": "tensor"}, {"mode": "soft", "iterations": 2, "inner_steps": 20, "inner_lr": 0.05}]
)
def test_recipe_with_a_frank_wolfe_section_runs_through_fit(tmp_path, section):
    recipe = load_recipe(
        {
            "name": "fw",
            "output_dir": str(tmp_path / "run"),
            "problem": {"kind": "test_frank_wolfe_zoo", "options": {"zoo_dir": str(tmp_path)}},
            "objectives": [{"name": "cross_entropy"}],
            "trainer": {"batch_size": 32, "progress_bar": False},
            "frank_wolfe": section,
            "export": {"plot": False, "mergekit": False},
        }
    )
    result = fit(recipe)
    run = tmp_path / "run"
    for name in ("recipe.yaml", "inputs.json", "eval.json", "eval.csv", "fw_history.json", "merged/model.safetensors", "merged/README.md"):
        assert (run / name).is_file(), name
    assert not (run / "coefficients.safetensors").exists()
    history = json.loads((run / "fw_history.json").read_text())
    assert [r["iteration"] for r in history] == list(range(section["iterations"]))
    assert min(r["accuracy"] for r in result.results.values()) > 0.8
    assert f"FW-Merging ({recipe.frank_wolfe.mode}, {recipe.frank_wolfe.lmo}-wise LMO" in (run / "merged/README.md").read_text()
    assert not (tmp_path / "run.partial").exists()  # its lock was held there and released


def test_a_frank_wolfe_fit_refuses_while_another_run_holds_the_directory(tmp_path):
    import os

    held = tmp_path / "run.partial"
    held.mkdir()
    (held / "lock").write_text(json.dumps({"pid": os.getppid(), "host": __import__("socket").gethostname()}))
    recipe = load_recipe({
        "name": "fw", "output_dir": str(tmp_path / "run"),
        "problem": {"kind": "test_frank_wolfe_zoo", "options": {"zoo_dir": str(tmp_path)}},
        "objectives": [{"name": "cross_entropy"}], "frank_wolfe": {"iterations": 1},
    })
    with pytest.raises(FileExistsError, match=f"live run \\(PID {os.getppid()}"):
        fit(recipe)
