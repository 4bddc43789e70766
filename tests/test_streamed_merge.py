"""The streamed merged model (learning/streamed_merge): on tiny BERT, GPT-2 and Llama models saved
as (sharded) safetensors, its losses and coefficient gradients equal an in-memory MergedModel's,
experts and the pretrained model run exactly, no unit's tensors outlive its run, and the merged
model it writes shard by shard equals the in-memory merge."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from adamerge.core.merged import MergedModel  # noqa: E402
from adamerge.core.task_vectors import TaskVectors  # noqa: E402
from adamerge.io.checkpoints import open_weights  # noqa: E402
from adamerge.learning.streamed_merge import StreamedMergedModel  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def pair(saved, skeleton_of, coefficients_for, tmp_path):
    """``pair(kind, granularity)``: the same merge in memory and streamed from files (coefficients
    moved off 0.3 so every slot differs); returns (in-memory, streamed, tasks, batches)."""

    def build(kind, granularity="layer"):
        pretrained, folders, tasks, batches, keys = saved(tmp_path, kind)
        options = {"chunks": 2} if granularity == "chunk" else {}
        coefficients = coefficients_for(granularity, folders, pretrained, keys, **options)
        with torch.no_grad():
            coefficients.raw.add_(0.1 * torch.randn(coefficients.raw.shape, generator=torch.Generator().manual_seed(3)))
        in_memory = MergedModel(pretrained, TaskVectors.from_models(pretrained, folders, include=[f"^{k}$" for k in keys]),
                                coefficients=coefficients)
        streamed = StreamedMergedModel(
            skeleton_of(pretrained), open_weights(str(tmp_path / "base")), folders,
            coefficients_for(granularity, folders, pretrained, keys, **options), keys, tmp_path / "vectors", progress=False,
        )
        streamed.coefficients.load_state_dict(coefficients.state_dict())
        return in_memory, streamed, tasks, batches

    return build


def _loss(model, tasks, batches, params):
    return sum(task(model, params, batches[name][0]).logits.float().square().mean() for name, task in tasks.items())


@pytest.mark.parametrize("kind,granularity", [("bert", "layer"), ("gpt2", "chunk"), ("llama", "layer"), ("llama", "task")])
def test_losses_and_coefficient_gradients_equal_the_in_memory_merge(pair, kind, granularity):
    in_memory, streamed, tasks, batches = pair(kind, granularity)
    expected = _loss(in_memory, tasks, batches, in_memory.merged_parameters())
    expected.backward()
    got = _loss(streamed, tasks, batches, streamed.merged_parameters())
    got.backward()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)
    reference = in_memory.coefficients.raw.grad
    assert reference.abs().sum() > 0
    assert torch.allclose(streamed.coefficients.raw.grad, reference, rtol=1e-4, atol=1e-7)


def test_experts_and_the_pretrained_model_run_exactly(pair):
    in_memory, streamed, tasks, batches = pair("llama")
    with torch.no_grad():
        for name, task in tasks.items():
            batch = batches[name][0]
            for params, reference in [
                (streamed.expert_parameters(name), in_memory.expert_parameters(name)),
                (streamed.pretrained_parameters(), in_memory.pretrained_parameters()),
            ]:
                assert torch.allclose(task(streamed, params, batch).logits, task(in_memory, reference, batch).logits, atol=1e-6)


def test_no_unit_keeps_its_tensors_after_it_ran(pair):
    _, streamed, tasks, batches = pair("gpt2")
    name, task = next(iter(tasks.items()))
    task(streamed, streamed.merged_parameters(), batches[name][0]).logits.sum().backward()
    assert all(p.device.type == "meta" for p in streamed.backbone.parameters())


def test_the_merged_model_written_shard_by_shard_equals_the_in_memory_merge(pair, tmp_path):
    in_memory, streamed, _, _ = pair("llama")
    written = open_weights(str(streamed.write_merged(tmp_path / "merged")))
    expected = in_memory.merged_state_dict()
    for key, tensor in expected.items():
        if key == "lm_head.weight":  # tied to the embeddings: written once, under the canonical name
            continue
        assert torch.allclose(written[key], tensor, atol=1e-6), key


def test_element_wise_coefficients_are_refused(transformer_setups, skeleton_of, coefficients_for, tmp_path):
    pretrained, experts, _, _, keys = transformer_setups["gpt2"]()
    pretrained.save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="granularity task, layer, chunk or group"):
        StreamedMergedModel(skeleton_of(pretrained), open_weights(str(tmp_path / "base")), {},
                            coefficients_for("element", experts, pretrained, keys), keys, tmp_path / "v")


def test_a_tied_head_reads_the_embeddings_cached_task_vectors(pair, tmp_path):
    _, streamed, _, _ = pair("llama")  # tie_word_embeddings: lm_head.weight is model.embed_tokens.weight
    head = next(unit for unit in streamed.units if unit.name == "lm_head")
    embedding = next(unit for unit in streamed.units if unit.name == "model.embed_tokens")
    assert head.cache == embedding.number
    assert sorted(p.name for p in (tmp_path / "vectors").iterdir()) == sorted(
        f"unit-{u.number:05d}.safetensors" for u in streamed.units if u.merged and u.cache == u.number)
