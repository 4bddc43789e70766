"""Progressive layer-wise distillation: stages on BERT, GPT-2 and Llama (the splitting itself is
in test_blocks.py); the cached features equal the full merged model's hidden states; learning
lowers every stage's loss and moves only the stage's own coefficients; resume after any finished
stage is exact; the ``progressive`` recipe section end to end."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from adamerge.core.element import ElementCoefficients  # noqa: E402
from adamerge.core.merged import MergedModel  # noqa: E402
from adamerge.learning.progressive import ProgressiveDistiller, masked_mse  # noqa: E402
from adamerge.core.task_vectors import TaskVectors  # noqa: E402


def full_merge(pretrained, experts, coefficients, keys):
    include = [f"^{k.replace('.', '[.]')}$" for k in keys]
    vectors = TaskVectors.from_models(pretrained, experts, include=include)
    return MergedModel(copy.deepcopy(pretrained), vectors, coefficients=coefficients)


# ---------------------------------------------------------------------- stages


def test_bert_stages_are_embeddings_each_layer_then_pooler(transformer_setups, coefficients_for):
    pretrained, experts, tasks, batches, keys = transformer_setups["bert"]()
    distiller = ProgressiveDistiller(copy.deepcopy(pretrained), experts, tasks, batches,
                                     coefficients_for("layer", experts, pretrained, keys), keys=keys, epochs=0, progress=False)
    stages = distiller.stages
    assert [s.name for s in stages] == ["embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "head"]
    assert all(k.startswith("bert.embeddings.") for k in stages[0].owns)
    assert stages[-1].owns == ["bert.pooler.dense.weight", "bert.pooler.dense.bias"]
    assert sorted(k for s in stages for k in s.owns) == sorted(keys)  # every tensor owned exactly once


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoder_tied_head_is_read_by_the_last_stage_and_owned_by_the_first(transformer_setups, coefficients_for, kind):
    model, experts, tasks, batches, keys = transformer_setups[kind]()
    distiller = ProgressiveDistiller(copy.deepcopy(model), experts, tasks, batches,
                                     coefficients_for("layer", experts, model, keys), keys=keys, epochs=0, progress=False)
    first, last = distiller.stages[0], distiller.stages[-1]
    embedding = "transformer.wte.weight" if kind == "gpt2" else "model.embed_tokens.weight"
    assert embedding in first.owns and embedding in last.reads and embedding not in last.owns
    assert len(distiller.stages) == 2 + 2


# ---------------------------------------------------------------------- exactness of the cached features


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_cached_features_equal_the_full_merged_models_hidden_states(transformer_setups, coefficients_for, kind):
    """After learning, each stage's merged features (what the next stage trained on) are the
    full merged model's hidden states, and the last stage's output its logits."""
    pretrained, experts, tasks, batches, keys = transformer_setups[kind]()
    coefficients = coefficients_for("layer", experts, pretrained, keys)
    distiller = ProgressiveDistiller(copy.deepcopy(pretrained), experts, tasks, batches, coefficients,
                                     keys=keys, epochs=2, lr=0.05, progress=False)
    seen = []
    original = distiller._stage_output

    def spy(stage, task, params, batch, features):
        out = original(stage, task, params, batch, features)
        if not torch.is_grad_enabled() and task == "e0" and batch is batches["e0"][0]:
            seen.append((stage.name, out.detach()))
        return out

    distiller._stage_output = spy
    result = distiller.run()
    merged = full_merge(pretrained, experts, coefficients, keys)
    params = merged.merged_parameters()
    assert all(torch.equal(params[k], result.merged[k]) for k in keys)
    batch = batches["e0"][0]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        full = merged.forward_with({**params, **getattr(tasks["e0"], "head", None).as_dict()} if kind == "bert" else params,
                                   **inputs, output_hidden_states=True, return_dict=True)
    expert = full_merge(pretrained, experts, coefficients, keys)
    with torch.no_grad():
        own = expert.forward_with(expert.expert_parameters("e0"), **inputs, output_hidden_states=True, return_dict=True)
    # per stage: the expert's features (the targets) come first, the merged model's last
    names = [s.name for s in distiller.stages[:-1]]
    expert_features = [next(out for name, out in seen if name == n) for n in names]
    merged_features = [[out for name, out in seen if name == n][-1] for n in names]
    mask = batch["attention_mask"].bool()
    for depth in range(len(names)):
        if kind != "bert" and depth == len(names) - 1:
            continue  # decoders' last hidden state is reported after the final norm
        torch.testing.assert_close(merged_features[depth][mask], full.hidden_states[depth][mask], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(expert_features[depth][mask], own.hidden_states[depth][mask], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- learning


@pytest.mark.parametrize("granularity", ["layer", "element", "chunk"])
def test_every_stage_learns_and_moves_only_its_own_coefficients(transformer_setups, coefficients_for, granularity):
    pretrained, experts, tasks, batches, keys = transformer_setups["bert"]()
    options = {"chunks": 2} if granularity == "chunk" else {}
    coefficients = coefficients_for(granularity, experts, pretrained, keys, **options)
    distiller = ProgressiveDistiller(copy.deepcopy(pretrained), experts, tasks, batches, coefficients,
                                     keys=keys, epochs=6, lr=0.05, progress=False)
    snapshots = []
    original = distiller._train_stage

    def record(stage, *args):
        out = original(stage, *args)
        snapshots.append((stage, {k: v.detach().clone() for k, v in coefficients.state_dict().items()}))
        return out

    distiller._train_stage = record
    result = distiller.run()
    for entry in result.history:
        assert entry["last_epoch_loss"] < entry["first_epoch_loss"], entry
    # a stage changes only the coefficients of the tensors it owns
    before = {k: v.clone() for k, v in coefficients_for(granularity, experts, pretrained, keys, **options).state_dict().items()}
    for stage, after in snapshots:
        owned = _owned_entries(coefficients, stage.owns)
        for name, tensor in after.items():
            moved = (tensor != before[name])
            assert not (moved & ~owned.get(name, torch.zeros_like(moved))).any(), (stage.name, name)
        before = after


def _owned_entries(coefficients, owns):
    """state-dict name -> mask of entries a stage owning ``owns`` may change."""
    if isinstance(coefficients, ElementCoefficients):
        return {f"raw.{coefficients._names[k]}": torch.ones(coefficients.raw[coefficients._names[k]].shape, dtype=torch.bool)
                for k in owns}
    layout = coefficients.layout
    slots = {s for k in owns for s in layout.tensor_slots[k]}
    columns = torch.tensor([s in slots for s in layout.trainable_slots])
    return {"raw": columns.expand(coefficients.raw.shape)}


def test_distillation_beats_task_arithmetic_on_the_targets(transformer_setups, coefficients_for):
    """The learned merge's final outputs are closer to each expert's than task arithmetic's (0.3)."""
    pretrained, experts, tasks, batches, keys = transformer_setups["bert"]()
    coefficients = coefficients_for("element", experts, pretrained, keys)
    result = ProgressiveDistiller(copy.deepcopy(pretrained), experts, tasks, batches, coefficients,
                                  keys=keys, epochs=15, lr=0.05, progress=False).run()
    ta = full_merge(pretrained, experts, coefficients_for("layer", experts, pretrained, keys), keys)
    learned_error = ta_error = 0.0
    with torch.no_grad():
        for name, task in tasks.items():
            expert = full_merge(pretrained, experts, coefficients_for("layer", experts, pretrained, keys), keys)
            for batch in batches[name]:
                target = task(expert, expert.expert_parameters(name), batch).logits
                learned_error += float(masked_mse(task(ta, result.merged, batch).logits, target, None))
                ta_error += float(masked_mse(task(ta, ta.merged_parameters(), batch).logits, target, None))
    assert learned_error < 0.5 * ta_error


def test_task_wise_coefficients_are_refused(transformer_setups, coefficients_for):
    pretrained, experts, tasks, batches, keys = transformer_setups["bert"]()
    with pytest.raises(ValueError, match="task-wise coefficients span every block"):
        ProgressiveDistiller(pretrained, experts, tasks, batches, coefficients_for("task", experts, pretrained, keys), keys=keys)


def test_a_group_across_blocks_is_refused(transformer_setups, coefficients_for):
    pretrained, experts, tasks, batches, keys = transformer_setups["bert"]()
    coefficients = coefficients_for("group", experts, pretrained, keys, groups={"dense": r"dense"})
    with pytest.raises(ValueError, match="spans stages"):
        ProgressiveDistiller(pretrained, experts, tasks, batches, coefficients, keys=keys, progress=False)


# ---------------------------------------------------------------------- resume


def test_resume_after_a_finished_stage_is_exact(transformer_setups, coefficients_for, crash, tmp_path):
    pretrained, experts, tasks, batches, keys = transformer_setups["bert"]()

    def distiller(coefficients, checkpoint):
        return ProgressiveDistiller(copy.deepcopy(pretrained), experts, tasks, batches, coefficients, keys=keys,
                                    epochs=3, lr=0.05, progress=False, checkpoint=checkpoint)

    reference = coefficients_for("element", experts, pretrained, keys)
    distiller(reference, None).run()

    interrupted = coefficients_for("element", experts, pretrained, keys)
    first = distiller(interrupted, tmp_path / "progress.safetensors")
    crash.arm(first, "_save_checkpoint", after=2)  # dies once two stages are saved
    with pytest.raises(crash.error):
        first.run()
    resumed = coefficients_for("element", experts, pretrained, keys)
    distiller(resumed, tmp_path / "progress.safetensors").run()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    damaged = tmp_path / "progress.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:64])
    with pytest.raises(ValueError, match=f"checkpoint {damaged}"):  # named with its role and file
        distiller(coefficients_for("element", experts, pretrained, keys), damaged).run()


def test_masked_mse_ignores_padding_by_hand():
    output = torch.tensor([[[1.0], [2.0]], [[3.0], [50.0]]])
    target = torch.zeros_like(output)
    mask = torch.tensor([[1, 1], [1, 0]])
    assert float(masked_mse(output, target, mask)) == pytest.approx((1 + 4 + 9) / 3)


# ---------------------------------------------------------------------- the recipe section


def test_progressive_recipe_writes_a_run_that_matches_a_hand_merge(zoo, recipe_dict, zoo_hand_merge, tmp_path):
    from adamerge.app import runner
    from adamerge.io.checkpoints import open_weights
    from adamerge.app.config import load_recipe

    recipe = load_recipe(recipe_dict(zoo, tmp_path, name="pd", progressive={"epochs": 2, "samples_per_task": 8}, objectives=[],
                                     trainer={"batch_size": 4, "progress_bar": False, "accelerator": "cpu"},
                                     coefficients={"granularity": "element", "init": 0.3, "freeze": ["word_embeddings"]}))
    result = runner.fit(recipe)
    run = result.run_dir
    for name in ("coefficients.safetensors", "coefficients.json", "coefficients.png", "progressive.json", "eval.json",
                 "inputs.json", "merged/model.safetensors"):
        assert (run / name).exists(), name
    assert not (tmp_path / "pd.partial").exists()
    coefficients = ElementCoefficients.load(run / "coefficients.safetensors")
    merged = dict(open_weights(str(run / "merged")))
    keys = [k for k in coefficients.layout.keys]
    by_hand = zoo_hand_merge(zoo, keys, lambda key, k: coefficients.effective(key)[k])
    for key in keys:
        torch.testing.assert_close(merged[key.removeprefix("bert.")], by_hand[key], atol=1e-6, rtol=1e-6)
    frozen = coefficients.effective("bert.embeddings.word_embeddings.weight")
    assert torch.equal(frozen, torch.full_like(frozen, 0.3))  # frozen: task arithmetic, as the paper's NLU code
    assert not torch.equal(coefficients.effective("bert.encoder.layer.0.attention.self.query.weight"),
                           torch.full_like(frozen[:, :1, :1].expand(2, 16, 16), 0.3))


@pytest.mark.parametrize("section, message", [
    ({"selection": {}}, "no `selection`"),
    ({"task_vectors": {"ties": {}}}, "ties/dare"),
    ({"frank_wolfe": {}}, "not both"),
])
def test_progressive_recipe_refuses_what_it_cannot_honour(zoo, recipe_dict, tmp_path, section, message):
    from adamerge.app.config import load_recipe

    with pytest.raises(ValueError, match=message):  # refused when the recipe loads, before any model is read
        load_recipe(recipe_dict(zoo, tmp_path, name="bad", progressive={"epochs": 1}, **section))


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_the_block_calls_kept_for_the_run_hold_no_hidden_states(transformer_setups, coefficients_for, kind):
    """Each batch's block arguments live the whole run: without their hidden states (each stage
    supplies its own), else every batch's embeddings would stay in memory beside the features."""
    pretrained, experts, tasks, batches, keys = transformer_setups[kind]()
    distiller = ProgressiveDistiller(copy.deepcopy(pretrained), experts, tasks, batches,
                                     coefficients_for("layer", experts, pretrained, keys), keys=keys, epochs=1, progress=False)
    distiller.run()
    calls = [call for per_task in distiller._calls.values() for call in per_task.values()]
    assert calls and all(call.hidden() is None for call in calls)
