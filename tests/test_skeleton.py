"""A model never whole in memory: parameters built on ``meta`` (buffers real), a stage's tensors
read from the checkpoint, stood in by free zeros, released back to ``meta`` with tied aliases
following; checkpoint names with or without the base prefix; freed heap handed back to the system."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from adamerge.core import skeleton as skeleton_module
from adamerge.core.skeleton import StreamedModel, parameters_on_meta, state_keys
from adamerge.io.checkpoints import open_weights


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.full((3,), 2.0))


def test_a_stage_is_read_in_stood_in_and_released_with_its_tied_alias(tmp_path):
    model = Tied()
    save_file({"embed.weight": model.embed.weight.detach().clone(), "scale": model.scale}, str(tmp_path / "w.safetensors"))
    with parameters_on_meta():
        skeleton = Tied()
    assert skeleton.embed.weight.is_meta and not skeleton.scale.is_meta  # parameters free, buffers real
    assert state_keys(skeleton) == ["scale", "embed.weight"]  # the tied head is an alias
    streamed = StreamedModel(skeleton, open_weights(str(tmp_path / "w.safetensors")), scope=["embed.weight"])
    streamed.materialise(["embed.weight"])
    assert torch.equal(skeleton.embed.weight, model.embed.weight) and skeleton.head.weight is skeleton.embed.weight
    streamed.stand_in(["embed.weight"])
    assert not skeleton.embed.weight.any() and skeleton.embed.weight.stride() == (0, 0)  # one expanded zero
    streamed.release(["embed.weight"])
    assert skeleton.embed.weight.is_meta and skeleton.head.weight.is_meta


def test_skeleton_buffers_are_real_and_equal_a_built_models(skeleton_of, transformer_setups):
    pretrained, *_ = transformer_setups["llama"]()
    skeleton = skeleton_of(pretrained)
    assert all(p.is_meta for p in skeleton.parameters())
    for (name, buffer), (_, reference) in zip(skeleton.named_buffers(), pretrained.named_buffers()):
        assert not buffer.is_meta and torch.equal(buffer, reference), name  # rotary tables computed as usual


def _rss_mib() -> float:
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    return int(status["VmRSS"].split()[0]) / 1024


@pytest.mark.skipif(skeleton_module._malloc_trim() is None, reason="no glibc malloc_trim here")
def test_freed_heap_holes_stay_resident_until_returned():
    pieces = [bytearray(16 * 1024) for _ in range(4096)]  # 64 MiB of heap chunks, every page touched
    for piece in pieces:
        piece[::4096] = b"x" * len(piece[::4096])
    before = _rss_mib()
    del pieces[:-1:2]  # free every other chunk: holes between live ones, none at the heap's top
    assert _rss_mib() > before - 8  # glibc keeps the holes resident
    assert skeleton_module.return_freed_memory()
    assert _rss_mib() < before - 24  # ~32 MiB of holes handed back
    del pieces


def test_checkpoint_names_may_lack_the_base_prefix_and_missing_merged_tensors_are_refused(skeleton_of, transformer_setups, tmp_path):
    pretrained, *_ = transformer_setups["bert"]()
    encoder = {k.removeprefix("bert."): v.contiguous() for k, v in pretrained.state_dict().items() if k.startswith("bert.")}
    save_file(encoder, str(tmp_path / "encoder.safetensors"))
    weights = open_weights(str(tmp_path / "encoder.safetensors"))
    scope = [k for k in pretrained.state_dict() if k.startswith("bert.")]
    with pytest.warns(UserWarning, match="classifier.weight"):  # the placeholder head: zeros, outside the merge
        streamed = StreamedModel(skeleton_of(pretrained), weights, scope=scope)
    streamed.materialise(["bert.pooler.dense.weight"])
    assert torch.equal(streamed.module.bert.pooler.dense.weight, pretrained.bert.pooler.dense.weight)
    with pytest.raises(KeyError, match="no tensor 'classifier.weight'"):
        StreamedModel(skeleton_of(pretrained), weights, scope=[*scope, "classifier.weight"])
