"""End to end on a tiny ``hf_sequence_classification`` problem on disk: ``fit`` writes a complete
run directory, ``merge`` runs data-free methods, ``evaluate_run`` reproduces, crashes resume
bit-exactly, Expert Merging++'s two stages, mergekit export."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from omegaconf import OmegaConf  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from adamerge import MergeCoefficients  # noqa: E402
from adamerge.app import learners, runner
from adamerge.io.checkpoints import open_weights  # noqa: E402
from adamerge.app.config import load_recipe  # noqa: E402
from adamerge.app.mergekit.write import mergekit_config, task_vector_processing  # noqa: E402
from adamerge.core.importance import allocate_chunks, tensor_importance  # noqa: E402
from adamerge.objectives.entropy import Entropy  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# ---------------------------------------------------------------------- the tiny zoo's files


def state_of(path) -> dict[str, torch.Tensor]:
    return dict(open_weights(str(path)))


@pytest.fixture(scope="module")
def fitted(zoo, recipe_dict, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    recipe = load_recipe(recipe_dict(zoo, out, name="ada"))
    return recipe, runner.fit(recipe)


# ---------------------------------------------------------------------- fit


def test_fit_writes_a_complete_run_directory(fitted, zoo, zoo_hand_merge):
    from transformers import AutoModel

    recipe, result = fitted
    run = result.run_dir
    assert run == run.parent / "ada" and sorted(p.name for p in run.parent.iterdir()) == ["ada"]  # no .partial left
    for name in ("recipe.yaml", "coefficients.safetensors", "coefficients.json", "coefficients.png", "eval.json",
                 "eval.csv", "metrics.csv", "training.png", "mergekit.yaml", "merged/README.md"):
        assert (run / name).is_file(), name

    saved = (run / "recipe.yaml").read_text()
    assert "${" not in saved and f"output_dir: {run}" in saved
    assert load_recipe(run / "recipe.yaml") == recipe

    coefficients = MergeCoefficients.load(run / "coefficients.safetensors")
    assert coefficients.layout.granularity == "layer" and coefficients.layout.expert_names == ("a", "b")
    values = coefficients().detach()
    assert not torch.allclose(values, torch.full_like(values, 0.3))  # it learned something
    torch.testing.assert_close(values, result.merged.coefficients().detach(), rtol=0, atol=0)
    readable = json.loads((run / "coefficients.json").read_text())
    names = list(coefficients.layout.slot_names)
    for k, expert in enumerate(("a", "b")):
        for key, value in readable["coefficients"][expert].items():
            assert value == pytest.approx(float(values[k, names.index(key)]), abs=1e-6)

    assert json.loads((run / "eval.json").read_text()) == result.results
    assert sorted(result.results) == ["a", "b"] and result.results["b"]["samples"] == 20
    csv_rows = (run / "eval.csv").read_text().splitlines()
    assert csv_rows[0].startswith("task,accuracy") and [r.split(",")[0] for r in csv_rows[1:]] == ["a", "b"]
    assert float(csv_rows[1].split(",")[1]) == pytest.approx(result.results["a"]["accuracy"])

    # the merged encoder opens with plain transformers and holds θ_0 + Σ c τ
    model = AutoModel.from_pretrained(str(run / "merged"))
    assert type(model).__name__ == "BertModel"
    key = "bert.encoder.layer.1.intermediate.dense.weight"
    expected = zoo_hand_merge(zoo, [key], lambda key, k: values[k, names.index(key)])[key]
    torch.testing.assert_close(model.state_dict()[key.removeprefix("bert.")], expected, rtol=1e-6, atol=1e-6)
    assert (run / "merged" / "tokenizer.json").exists() or (run / "merged" / "vocab.txt").exists()
    for task, labels in (("a", 2), ("b", 3)):
        head = load_file(str(run / "merged" / "heads" / f"{task}.safetensors"))
        expert = state_of(zoo / "zoo" / task)
        assert head["classifier.weight"].shape == (labels, 16)
        assert torch.equal(head["classifier.weight"], expert["classifier.weight"])
        assert torch.equal(head["classifier.bias"], expert["classifier.bias"])

    card = (run / "merged" / "README.md").read_text()
    assert "base_model" not in card.split("---")[1]  # a local base has no hub id: no path in the front matter
    assert str(zoo / "zoo" / "a") in card and str(zoo / "zoo" / "b") in card
    assert "layer-wise coefficients learned with ['entropy']" in card and "adamerge fit recipe.yaml" in card


def test_memory_options_reach_the_run_and_keep_the_result(fitted, zoo, recipe_dict, tmp_path, monkeypatch):
    """``task_vectors.offload`` and ``trainer.per_task_backward`` only change where tensors live
    and when activations are freed: the learned coefficients are the default run's."""
    made = []

    build_learner = learners.build_learner
    monkeypatch.setattr(learners, "build_learner", lambda *args: made.append(build_learner(*args)) or made[-1])
    recipe = load_recipe(
        recipe_dict(zoo, tmp_path, name="lean"), ["task_vectors.offload=true", "trainer.per_task_backward=true"]
    )
    result = runner.fit(recipe)
    assert result.merged.vectors.offload and made[0].per_task_backward
    torch.testing.assert_close(
        result.merged.coefficients().detach(), fitted[1].merged.coefficients().detach(), rtol=1e-5, atol=1e-6
    )


def test_mergekit_config_reproduces_the_layer_wise_coefficients(fitted, zoo):
    _, result = fitted
    config = OmegaConf.to_container(OmegaConf.load(result.run_dir / "mergekit.yaml"))
    assert config["merge_method"] == "task_arithmetic" and config["base_model"] == str(zoo / "base")
    assert config["parameters"] == {"normalize": False}
    assert [m["model"] for m in config["models"]] == [str(zoo / "zoo" / "a"), str(zoo / "zoo" / "b")]
    values = result.merged.coefficients().detach()
    names = list(result.merged.layout.slot_names)
    base_names = list(state_of(zoo / "base"))
    for k, model in enumerate(config["models"]):
        filters = model["parameters"]["weight"]
        assert filters[-1] == {"value": 0.0}  # everything else (the heads) stays at the base
        for name in base_names:
            # mergekit: the first filter that is a substring of the tensor name applies
            value = next(f["value"] for f in filters if "filter" not in f or f["filter"] in name)
            if name in result.merged.keys:
                assert value == pytest.approx(float(values[k, names.index(name)]), abs=1e-6), name
            else:
                assert value == 0.0, name


def test_mergekit_absent_when_checkpoint_names_differ(fitted, zoo):
    _, result = fitted
    problem = SimpleNamespace(description={"base": str(zoo / "encoder_only"), "experts": {"a": "x", "b": "y"}})
    config, reason = mergekit_config(result.merged.coefficients, problem)
    assert config is None and "named differently" in reason
    problem = SimpleNamespace(description={"base": str(zoo / "base"), "experts": {"a": torch.nn.Linear(1, 1), "b": "y"}})
    assert mergekit_config(result.merged.coefficients, problem)[0] is None


def test_mergekit_absent_for_coefficients_on_processed_task_vectors(fitted, zoo):
    """Weights learned on TIES/DARE/TSV-processed vectors are not mergekit task_arithmetic weights."""
    _, result = fitted
    problem = SimpleNamespace(description={"base": str(zoo / "base"), "experts": {"a": str(zoo / "zoo" / "a"), "b": str(zoo / "zoo" / "b")}})
    assert mergekit_config(result.merged.coefficients, problem)[0] is not None
    config, reason = mergekit_config(result.merged.coefficients, problem, processed="TSV-M")
    assert config is None and "task vectors processed by TSV-M" in reason


def test_the_processing_named_for_mergekit_lists_every_transform_of_the_task_vectors():
    from adamerge.app.config import TaskVectorConfig

    def named(**sections):  # a recipe's task_vectors section, as a recipe file would give it
        return task_vector_processing(OmegaConf.merge(OmegaConf.structured(TaskVectorConfig), sections))

    assert named() is None
    assert named(tsv={"alpha": 1.0}) == "TSV-M"
    assert named(ties={"density": 0.2}, dare={"density": 0.5}) == "TIES/DARE"
    assert named(ties={"density": 0.2}, start={"method": "wudi"}) == "TIES/wudi-start"


def test_evaluate_run_reproduces_the_fit_exactly(fitted):
    _, result = fitted
    assert runner.evaluate_run(result.run_dir) == result.results
    with pytest.raises(FileNotFoundError, match="not a finished adamerge run"):
        runner.evaluate_run(result.run_dir / "merged")


# ---------------------------------------------------------------------- data-free merges


def hand_ties(zoo, keys, density, scaling):
    base = state_of(zoo / "base")
    experts = [state_of(zoo / "zoo" / t) for t in ("a", "b")]
    taus = [{k: e[k] - base[k] for k in keys} for e in experts]
    trimmed = []
    for tau in taus:  # one magnitude threshold per expert over the whole scope
        flat = torch.cat([tau[k].flatten() for k in keys]).abs()
        keep = math.ceil(density * flat.numel())
        threshold = flat.sort(descending=True).values[keep - 1]
        trimmed.append({k: torch.where(tau[k].abs() >= threshold, tau[k], 0.0) for k in keys})
    merged = {}
    for k in keys:
        stack = torch.stack([t[k] for t in trimmed])
        sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
        agree = (stack != 0) & (torch.sign(stack) == sign)
        mean = (stack * agree).sum(0) / agree.sum(0).clamp(min=1)
        merged[k] = base[k] + scaling * mean
    return merged


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_merge_methods_write_a_run_and_reevaluate(zoo, recipe_dict, zoo_hand_merge, tmp_path, method):
    from transformers import AutoModel

    args = {"scaling": 0.4} if method == "task_arithmetic" else {"density": 0.3, "scaling": 0.8}
    recipe = load_recipe(recipe_dict(zoo, tmp_path, name=method, method={"name": method, "args": args}))
    result = runner.merge(recipe)
    run = result.run_dir
    mergekit = ["mergekit.txt", "mergekit.yaml"] if method == "task_arithmetic" else ["mergekit.txt"]  # ties trims model-wide
    assert sorted(p.name for p in run.iterdir()) == sorted(["eval.csv", "eval.json", "inputs.json", "merged", "recipe.yaml", *mergekit])
    assert f"data-free `{method}`" in (run / "merged" / "README.md").read_text()
    assert "adamerge merge recipe.yaml" in (run / "merged" / "README.md").read_text()
    keys = [k for k in state_of(zoo / "base") if k.startswith("bert.")]
    if method == "task_arithmetic":
        expected = zoo_hand_merge(zoo, keys, lambda key, k: 0.4)
    else:
        expected = hand_ties(zoo, keys, 0.3, 0.8)
    state = AutoModel.from_pretrained(str(run / "merged")).state_dict()
    for key in keys:
        torch.testing.assert_close(state[key.removeprefix("bert.")], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert json.loads((run / "eval.json").read_text()) == result.results
    assert runner.evaluate_run(run) == result.results
    with pytest.raises(ValueError, match="adamerge merge"):
        runner.fit(recipe)
    with pytest.raises(FileExistsError, match="overwrite=true"):
        runner.merge(recipe)
    if method == "task_arithmetic":  # overwrite=true replaces the finished run
        again = runner.merge(load_recipe(recipe_dict(zoo, tmp_path, name=method, overwrite=True,
                                                     method={"name": method, "args": {"scaling": 0.0}})))
        state = AutoModel.from_pretrained(str(again.run_dir / "merged")).state_dict()
        base = state_of(zoo / "base")
        torch.testing.assert_close(state["encoder.layer.0.output.dense.weight"], base["bert.encoder.layer.0.output.dense.weight"])
        assert sorted(p.name for p in tmp_path.iterdir()) == [method]


def test_merge_refuses_a_learning_recipe(zoo, recipe_dict, tmp_path):
    with pytest.raises(ValueError, match="no 'method' section"):
        runner.merge(load_recipe(recipe_dict(zoo, tmp_path)))


# ---------------------------------------------------------------------- crash and resume

def test_a_crashed_run_leaves_only_a_partial_dir_and_resumes_identically(zoo, recipe_dict, crash, tmp_path, capsys):
    trainer = {"max_steps": 6, "batch_size": 4, "checkpoint_every_n_steps": 2, "progress_bar": False,
               "log_every_n_steps": 1, "accelerator": "cpu"}
    export = {"plot": False}
    straight = runner.fit(load_recipe(recipe_dict(zoo, tmp_path, name="straight", trainer=trainer, export=export)))

    recipe = load_recipe(recipe_dict(zoo, tmp_path, name="crashy", trainer=trainer, export=export))
    crash.arm(Entropy, "forward", after=2 * 3 + 1)  # two tasks per step: dies in step 4, after the step-2 checkpoint
    with pytest.raises(crash.error):
        runner.fit(recipe)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crashy.partial", "straight"]
    partial = tmp_path / "crashy.partial"
    assert (partial / "checkpoints" / "last.ckpt").exists() and (partial / "recipe.yaml").exists()
    assert torch.load(partial / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2

    different = load_recipe(recipe_dict(zoo, tmp_path, name="crashy", trainer={**trainer, "max_steps": 7}, export=export))
    with pytest.raises(ValueError, match="different recipe"):
        runner.fit(different)

    crash.arm(Entropy, "forward")  # counts only
    capsys.readouterr()
    resumed = runner.fit(recipe)
    assert "resuming the interrupted run" in capsys.readouterr().out
    assert crash.calls == 2 * (6 - 2)  # steps 3..6 only: it resumed, it did not start over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crashy", "straight"]
    a = load_file(str(straight.run_dir / "coefficients.safetensors"))
    b = load_file(str(resumed.run_dir / "coefficients.safetensors"))
    assert torch.equal(a["raw"], b["raw"]) and torch.equal(a["values"], b["values"])
    assert resumed.results == straight.results
    with pytest.raises(FileExistsError, match="already holds a finished run"):
        runner.fit(recipe)


# ---------------------------------------------------------------------- Expert Merging++


def test_allocate_chunks_by_hand():
    importance = {"a": 0.5, "b": 0.3, "c": 0.2}
    rows = {"a": 3, "b": 10, "c": 10}
    # floor(10 · I): a 5 -> capped at 3 rows, b 3, c 2
    assert allocate_chunks(importance, 10, rows) == {"a": 3, "b": 3, "c": 2}
    # κ = 2: I² = .25, .09, .04 (sum .38) -> floor(6.58) = 6 -> 3, floor(2.37) = 2, floor(1.05) = 1
    assert allocate_chunks(importance, 10, rows, kappa=2.0) == {"a": 3, "b": 2, "c": 1}
    assert allocate_chunks(importance, 3, rows) == {"a": 1, "b": 0, "c": 0}  # m = 0 freezes
    with pytest.raises(ValueError, match="budget"):
        allocate_chunks(importance, 0, rows)


def test_tensor_importance_by_hand():
    from adamerge import TaskVectors
    from adamerge.core.layouts import build_layout

    base = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}
    e1 = {"w": torch.tensor([[1.0, -1.0, 0.0], [2.0, 0.0, 0.0]]), "b": torch.tensor([1.0, 1.0])}  # |τ|₁: 4, 2
    e2 = {"w": torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -3.0]]), "b": torch.tensor([0.0, -4.0])}  # |τ|₁: 3, 4
    tv = TaskVectors.from_models(base, {"x": e1, "y": e2})
    layout = build_layout(["x", "y"], {"w": (2, 3), "b": (2,)}, "layer")
    c = torch.zeros(2, 2)
    slot = {name: i for i, name in enumerate(layout.slot_names)}
    c[:, slot["w"]] = torch.tensor([0.5, -1.0])
    c[:, slot["b"]] = torch.tensor([2.0, 0.25])
    importance = tensor_importance(MergeCoefficients(layout, init=c), tv)
    raw = {"w": 0.5 * 4 + 1.0 * 3, "b": 2.0 * 2 + 0.25 * 4}  # Σ_k |c_k| |τ_k|₁ = 5, 5
    total = sum(raw.values())
    assert importance == pytest.approx({k: v / total for k, v in raw.items()})


def test_expert_merging_plus_plus_two_stages(zoo, recipe_dict, tmp_path):
    scope = {"include": [r"^bert\.encoder\."]}
    alignment = [{"name": "alignment", "args": {"hidden_layers": [1, 2], "l1_weight": 0.1}}]
    quick = {"export": {"plot": False}}
    stage1 = runner.fit(load_recipe(recipe_dict(zoo, tmp_path, name="stage1", task_vectors=scope, objectives=alignment, **quick)))
    assert (stage1.run_dir / "mergekit.yaml").exists()
    s1_file = str(stage1.run_dir / "coefficients.safetensors")
    s1 = MergeCoefficients.load(s1_file)
    s1_values = s1().detach()
    s1_names = list(s1.layout.slot_names)

    coefficients = {"granularity": "chunk", "init": s1_file, "chunks": {"importance_from": s1_file, "budget": 2}}
    stage2 = runner.fit(load_recipe(recipe_dict(
        zoo, tmp_path, name="stage2", task_vectors=scope, objectives=alignment, coefficients=coefficients, **quick)))
    assert not (stage2.run_dir / "mergekit.yaml").exists()  # chunk-wise: no mergekit equivalent
    s2 = MergeCoefficients.load(stage2.run_dir / "coefficients.safetensors")
    layout = s2.layout

    # the allocation, by hand: I_ℓ ∝ Σ_k |c_k^ℓ| ‖τ_k^ℓ‖₁, m_ℓ = min(rows, floor(2·L·I_ℓ / Σ I))
    base = state_of(zoo / "base")
    experts = [state_of(zoo / "zoo" / "a"), state_of(zoo / "zoo" / "b")]
    keys = [k for k in base if k.startswith("bert.encoder.")]
    assert sorted(layout.keys) == sorted(keys)
    raw = {
        k: sum(abs(float(s1_values[e, s1_names.index(k)])) * float((ex[k] - base[k]).abs().sum()) for e, ex in enumerate(experts))
        for k in keys
    }
    total = sum(raw.values())
    expected_m = {k: min(base[k].shape[0], math.floor(2 * len(keys) * raw[k] / total)) for k in keys}
    assert 0 in expected_m.values() and max(expected_m.values()) >= 2  # a real mix: frozen and chunked tensors
    for key in keys:
        slots = layout.tensor_slots[key]
        m = expected_m[key]
        names = [layout.slot_names[s] for s in slots]
        if m == 0:
            assert names == [f"{key} (frozen)"] and slots[0] in layout.frozen
        elif m == 1:
            assert names == [key]
        else:
            assert names == [f"{key}[{j}/{m}]" for j in range(m)]
        # stage 2 starts every chunk at the stage-1 value of its tensor; frozen ones stay there
        for s in slots:
            torch.testing.assert_close(s2.initial[:, s], s1_values[:, s1_names.index(key)])
            if m == 0:
                torch.testing.assert_close(s2().detach()[:, s], s1_values[:, s1_names.index(key)])
    assert not torch.equal(s2().detach(), s2.initial)  # and stage 2 trained
    assert runner.evaluate_run(stage2.run_dir) == stage2.results


def test_string_labels_are_mapped_by_label_names_and_not_needed_to_learn(zoo, recipe_dict, tmp_path):
    """Task a's rows relabelled with class names: evaluation through label_names matches the
    integer-labelled run exactly; a label-free fit on names its expert does not know still runs."""
    rows = [json.loads(line) for line in (zoo / "data" / "a" / "test.jsonl").read_text().splitlines()]
    names = ["no", "yes"]
    folder = tmp_path / "named-data"
    folder.mkdir()
    (folder / "test.jsonl").write_text("\n".join(json.dumps({**r, "label": names[r["label"]]}) for r in rows) + "\n")
    recipe = recipe_dict(zoo, tmp_path, name="named")
    recipe["problem"]["tasks"]["a"].update(calibration={"path": str(folder)}, evaluation={"path": str(folder)},
                                            label_names=names)
    named = runner.fit(load_recipe(recipe))
    plain = runner.fit(load_recipe(recipe_dict(zoo, tmp_path, name="plain")))
    assert named.results["a"]["accuracy"] == plain.results["a"]["accuracy"]
    del recipe["problem"]["tasks"]["a"]["label_names"]
    recipe["problem"]["tasks"]["a"]["evaluation"] = None
    learned = runner.fit(load_recipe({**recipe, "name": "unnamed"}))  # 'no'/'yes' are not in the expert's label2id
    assert "a" not in learned.results and "b" in learned.results
