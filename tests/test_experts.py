"""Reading one expert at a time: each expert's task vectors are those TaskVectors holds (modules,
state dicts, files, LoRA adapters), only the asked keys are read, only from that expert, and
the scope's checks apply."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from adamerge import TaskVectors
from adamerge.methods.experts import ExpertReader
from fixtures.families import make_mlp, perturbed


def test_task_vectors_are_what_task_vectors_hold_for_every_kind_of_source(tmp_path):
    pretrained = make_mlp()
    experts = [perturbed(pretrained, seed) for seed in (1, 2, 3)]
    save_file({k: v.contiguous() for k, v in experts[1].state_dict().items()}, str(tmp_path / "e1.safetensors"))
    sources = {"module": experts[0], "file": tmp_path / "e1.safetensors", "dict": experts[2].state_dict()}
    expected = TaskVectors.from_models(pretrained, sources, exclude="4.bias")
    reader = ExpertReader(pretrained, sources, exclude="4.bias")
    assert reader.names == ("module", "file", "dict") and reader.keys == expected.keys
    for k, name in enumerate(reader.names):
        read = dict(reader.task_vectors(name))
        assert list(read) == expected.keys
        for key, tau in read.items():
            assert tau.dtype == torch.float32 and torch.equal(tau, expected[key][k]), (name, key)


def test_only_the_asked_keys_of_the_asked_expert_are_read():
    pretrained = make_mlp()
    reads = []

    class Counted(dict):
        def __init__(self, name, state):
            super().__init__(state)
            self.name = name

        def __getitem__(self, key):
            reads.append((self.name, key))
            return super().__getitem__(key)

    experts = {name: Counted(name, perturbed(pretrained, seed).state_dict()) for name, seed in (("x", 1), ("y", 2))}
    reader = ExpertReader(pretrained, experts)
    reads.clear()
    assert [key for key, _ in reader.task_vectors("y", ["2.weight", "0.bias"])] == ["2.weight", "0.bias"]
    assert reads == [("y", "2.weight"), ("y", "0.bias")]


def test_lora_experts_are_read_as_their_delta(tiny_llama, write_adapter, tmp_path):
    base = tiny_llama()
    write_adapter(base, tmp_path / "a0", seed=1, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    expected = TaskVectors.from_models(base, [str(tmp_path / "a0")], low_rank=False)
    reader = ExpertReader(base, [str(tmp_path / "a0")])
    read = dict(reader.task_vectors("expert_0"))
    assert any(read[key].any() for key in read)
    for key in expected.keys:
        assert torch.equal(read[key], expected[key][0]), key


def test_a_bad_expert_is_named_with_its_key():
    pretrained = make_mlp()
    broken = perturbed(pretrained, 1).state_dict()
    broken["2.weight"] = broken["2.weight"].clone()
    broken["2.weight"][0, 0] = float("nan")
    reader = ExpertReader(pretrained, {"bad": broken})
    with pytest.raises(ValueError, match=r"expert 'bad' has non-finite values \(NaN/inf\) in '2.weight'"):
        dict(reader.task_vectors("bad"))
