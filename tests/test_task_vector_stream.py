"""The data-free merges' per-tensor path: :class:`TaskVectorStream` gives ``TaskVectors``' values key
by key (files, state dicts, bf16, LoRA factors), TIES's model-wide thresholds exactly, and a merge
never holds more than one key of the experts at a time."""

from __future__ import annotations

import warnings
import weakref

import pytest
import torch
from safetensors.torch import save_file

from adamerge import TaskVectors
from adamerge.core.task_vector_stream import TaskVectorStream
from adamerge.io.checkpoints import LazySafetensors, LazyWeights
from adamerge.methods import METHODS
from adamerge.methods.base import merge_each
from fixtures.families import make_mlp, perturbed


def test_each_key_is_what_task_vectors_hold(tmp_path):
    pretrained = make_mlp()
    experts = [perturbed(pretrained, seed) for seed in (1, 2, 3)]
    save_file({k: v.contiguous() for k, v in experts[1].state_dict().items()}, str(tmp_path / "e1.safetensors"))
    sources = {"module": experts[0], "file": tmp_path / "e1.safetensors", "dict": experts[2].state_dict()}
    for base, named in [(pretrained, sources), (bf16(pretrained.state_dict()), {k: bf16(e.state_dict()) for k, e in
                                                                                    zip(sources, experts)})]:
        expected = TaskVectors.from_models(base, named, exclude="4.bias")
        stream = TaskVectorStream(base, named, exclude="4.bias")
        assert stream.keys == expected.keys and stream.expert_names == expected.expert_names
        for key in reversed(stream.keys):
            assert torch.equal(stream[key], expected[key]), key


def bf16(state: dict) -> dict:
    return {k: v.to(torch.bfloat16) for k, v in state.items()}


def test_lora_experts_are_read_from_their_factors(tiny_llama, write_adapter, tmp_path):
    base = tiny_llama()
    for k in range(2):
        write_adapter(base, tmp_path / f"a{k}", seed=k + 1, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    sources = [str(tmp_path / "a0"), str(tmp_path / "a1")]
    expected, stream = TaskVectors.from_models(base, sources), TaskVectorStream(base, sources)
    assert any(expected.low_rank(key) is not None for key in expected.keys)
    for key in stream.keys:
        assert torch.equal(stream[key], expected[key]), key


@pytest.mark.parametrize("density", [1e-3, 0.2, 0.5, 1.0])
def test_magnitude_thresholds_are_the_model_thresholds(density):
    generator = torch.Generator().manual_seed(0)

    def values(*shape):  # magnitudes over 12 decades, a fifth of them zero, many repeated
        x = torch.randn(shape, generator=generator) * 10.0 ** torch.randint(-8, 4, shape, generator=generator)
        x = torch.where(torch.rand(shape, generator=generator) < 0.4, x.round(decimals=2), x)
        return x * (torch.rand(shape, generator=generator) > 0.2)

    pretrained = {"a": values(40, 30), "b": values(57), "c": values(3, 4, 5)}
    experts = [{k: v + values(*v.shape) for k, v in pretrained.items()} for _ in range(3)]
    expected = TaskVectors.from_models(pretrained, experts).model_thresholds(density)
    assert torch.equal(TaskVectorStream(pretrained, experts).magnitude_thresholds(density), expected)


class Reads:
    """Which keys have tensors alive: every expert read (``order`` lists them) and every stack."""

    def __init__(self):
        self.live: dict[int, str] = {}
        self.count = 0
        self.most_keys = 0
        self.order: list[str] = []

    def track(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        token, self.count = self.count, self.count + 1
        self.live[token] = key
        weakref.finalize(tensor, self.live.pop, token)
        self.most_keys = max(self.most_keys, len(set(self.live.values())))
        return tensor


class CountedExpert(LazyWeights):
    """An expert whose every read is a new tensor, tracked until it is freed."""

    def __init__(self, state: dict, reads: Reads):
        self.state, self.reads = state, reads

    def __getitem__(self, key: str) -> torch.Tensor:
        self.reads.order.append(key)
        return self.reads.track(key, self.state[key].clone())

    def __contains__(self, key: object) -> bool:
        return key in self.state  # Mapping's default would read the tensor

    def __iter__(self):
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


@pytest.mark.parametrize("name, args, passes", [
    ("average", {}, 1), ("task_arithmetic", {}, 1), ("ties", {}, 3), ("ties", {"trim_scope": "tensor"}, 1),
    ("dare", {}, 1), ("lines", {}, 1), ("tsv", {}, 1), ("iso_c", {}, 1), ("iso_cts", {}, 1),
    ("wudi", {"iterations": 2, "device": "cpu"}, 1),
])
def test_a_merge_holds_one_keys_expert_tensors_at_a_time(name, args, passes, monkeypatch):
    pretrained, reads = make_mlp(), Reads()
    experts = [CountedExpert(perturbed(pretrained, seed).state_dict(), reads) for seed in (1, 2, 3, 4)]
    read = TaskVectorStream.__getitem__
    monkeypatch.setattr(TaskVectorStream, "__getitem__", lambda stream, key: reads.track(key, read(stream, key)))
    METHODS.get(name)(pretrained, experts, **args)
    keys = list(pretrained.state_dict())
    assert reads.order == [key for key in keys for _ in experts] * passes  # key by key, each pass
    assert reads.count == passes * len(keys) * (len(experts) + 1)  # the reads and their stacks
    assert reads.most_keys == 1


def test_each_keys_stack_is_freed_before_the_next_key_is_read():
    pretrained, reads = make_mlp(), Reads()
    stream = TaskVectorStream(pretrained, [CountedExpert(perturbed(pretrained, s).state_dict(), reads) for s in (1, 2)])
    merged = merge_each(pretrained, stream, lambda key, taus: reads.track(key, taus).sum(dim=0))
    assert reads.most_keys == 1 and reads.count == 3 * len(stream.keys)
    torch.testing.assert_close(merged[0].weight, perturbed(pretrained, 1)[0].weight + perturbed(pretrained, 2)[0].weight
                               - pretrained[0].weight)


def test_expert_files_are_unmapped_after_each_key(tmp_path, monkeypatch):
    pretrained, closed = make_mlp(), []
    for seed in (1, 2):
        save_file({k: v.contiguous() for k, v in perturbed(pretrained, seed).state_dict().items()},
                  str(tmp_path / f"e{seed}.safetensors"))
    monkeypatch.setattr(LazySafetensors, "close", lambda self: closed.append(self.files[0].name))
    METHODS.get("average")(pretrained, [tmp_path / "e1.safetensors", tmp_path / "e2.safetensors"])
    assert closed == ["e1.safetensors", "e2.safetensors"] * len(pretrained.state_dict())


def test_an_expert_identical_to_the_base_is_named_once():
    pretrained = make_mlp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        METHODS.get("ties")(pretrained, {"real": perturbed(pretrained, 1), "copycat": pretrained})
    said = [str(w.message) for w in caught if "identical to the pretrained model" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("expert 'copycat'")
