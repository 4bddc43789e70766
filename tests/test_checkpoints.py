"""Reading weights from every source, and atomic writes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adamerge.io.checkpoints import (
    LazySafetensors,
    atomic_directory,
    describe,
    open_weights,
    save_safetensors,
    write_text,
)


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(3, 4, generator=generator),
        "a.bias": torch.randn(3, generator=generator),
        "b.weight": torch.randn(2, 3, generator=generator),
        "steps": torch.tensor(7),
    }


def assert_same(loaded, expected):
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


# ---------------------------------------------------------------------- reading


def test_open_module_and_state_dict():
    module = nn.Linear(3, 2)
    weights = open_weights(module)
    assert set(weights) == {"weight", "bias"}
    assert torch.equal(weights["weight"], module.weight) and not weights["weight"].requires_grad
    state = tensors()
    assert open_weights(state) is state
    with pytest.raises(TypeError, match="state dict entry 'x' is a int, not a tensor"):
        open_weights({"x": 3})


def test_open_safetensors_file_is_lazy(tmp_path):
    save_file(tensors(), str(tmp_path / "w.safetensors"))
    weights = open_weights(tmp_path / "w.safetensors")
    assert isinstance(weights, LazySafetensors)
    assert len(weights) == 4 and "a.bias" in weights and "nope" not in weights
    assert_same(weights, tensors())
    with pytest.raises(KeyError):
        weights["nope"]


def test_open_torch_files(tmp_path):
    torch.save(tensors(), tmp_path / "w.bin")
    assert_same(open_weights(tmp_path / "w.bin"), tensors())
    torch.save({"state_dict": tensors(), "epoch": 3}, tmp_path / "ckpt.pt")
    assert_same(open_weights(str(tmp_path / "ckpt.pt")), tensors())
    torch.save({"nested": {"deep": torch.zeros(1)}}, tmp_path / "odd.pt")
    with pytest.raises(TypeError, match="does not hold a flat state dict of tensors"):
        open_weights(tmp_path / "odd.pt")


def test_torch_files_never_run_pickled_code(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"w": torch.zeros(1), "payload": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        open_weights(tmp_path / "evil.pt")
    assert not marker.exists()


def test_directories(tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    save_file(tensors(), str(single / "model.safetensors"))
    torch.save(tensors(1), single / "pytorch_model.bin")  # safetensors wins
    assert_same(open_weights(single), tensors())

    bins = tmp_path / "bins"
    bins.mkdir()
    parts = tensors(2)
    torch.save({k: parts[k] for k in ("a.weight", "a.bias")}, bins / "pytorch_model-1.bin")
    torch.save({k: parts[k] for k in ("b.weight", "steps")}, bins / "pytorch_model-2.bin")
    index = {"weight_map": {"a.weight": "pytorch_model-1.bin", "a.bias": "pytorch_model-1.bin",
                            "b.weight": "pytorch_model-2.bin", "steps": "pytorch_model-2.bin"}}
    (bins / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert_same(open_weights(bins), parts)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no model weights"):
        open_weights(empty)
    with pytest.raises(FileNotFoundError, match="no weights at"):
        open_weights(tmp_path / "absent")


def test_lazy_safetensors_reads_sharded_index(tmp_path):
    parts = tensors(3)
    save_file({k: parts[k] for k in ("a.weight", "steps")}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: parts[k] for k in ("a.bias", "b.weight")}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {
        "metadata": {"total_size": 0},
        "weight_map": {
            "a.weight": "model-00001-of-00002.safetensors",
            "steps": "model-00001-of-00002.safetensors",
            "a.bias": "model-00002-of-00002.safetensors",
            "b.weight": "model-00002-of-00002.safetensors",
        },
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    weights = open_weights(tmp_path)
    assert isinstance(weights, LazySafetensors) and len(weights.files) == 2
    assert_same(weights, parts)
    assert "4 tensors" in repr(weights)


def test_describe():
    assert describe(nn.Linear(1, 1)) == "<Linear module>"
    assert describe({}) == "<state dict>"
    assert describe("x/y.safetensors") == "x/y.safetensors"


# ---------------------------------------------------------------------- atomic writes


def test_save_safetensors_atomic(tmp_path):
    path = tmp_path / "deep" / "w.safetensors"
    save_safetensors(tensors(), path, metadata={"k": "v"})
    assert_same(load_file(str(path)), tensors())
    assert os.listdir(path.parent) == ["w.safetensors"]
    # a failed write leaves the previous file intact and no temporary behind
    shared = torch.randn(4)
    with pytest.raises(RuntimeError, match="share memory"):  # raised by the writer, mid-write
        save_safetensors({"x": shared, "y": shared}, path)
    assert_same(load_file(str(path)), tensors())
    assert os.listdir(path.parent) == ["w.safetensors"]
    # non-contiguous tensors are fine
    save_safetensors({"t": torch.randn(3, 4).t()}, path)
    assert load_file(str(path))["t"].shape == (4, 3)


def test_write_text_atomic(tmp_path):
    path = tmp_path / "sub" / "notes.txt"
    write_text(path, "one")
    write_text(path, "two")
    assert path.read_text() == "two"
    assert os.listdir(path.parent) == ["notes.txt"]
    with pytest.raises(TypeError):
        write_text(path, 3)  # not text: nothing replaced, nothing left over
    assert path.read_text() == "two" and os.listdir(path.parent) == ["notes.txt"]


def test_atomic_directory_success_and_failure(tmp_path):
    target = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target) as staging:
            (staging / "half.txt").write_text("partial")
            raise RuntimeError("boom")
    assert not target.exists()
    assert os.listdir(tmp_path) == []  # no finished-looking (or any) leftovers

    with atomic_directory(target) as staging:
        assert staging != target and not target.exists()  # built elsewhere until done
        (staging / "result.txt").write_text("first")
    assert (target / "result.txt").read_text() == "first"
    assert os.listdir(tmp_path) == ["run"]

    # replacing: the old directory survives a failure untouched ...
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "result.txt").write_text("second")
            assert (target / "result.txt").read_text() == "first"
            raise RuntimeError("crash")
    assert os.listdir(target) == ["result.txt"] and (target / "result.txt").read_text() == "first"
    assert os.listdir(tmp_path) == ["run"]

    # ... and is replaced as a whole on success
    with atomic_directory(target) as staging:
        (staging / "other.txt").write_text("second")
    assert os.listdir(target) == ["other.txt"]
    assert os.listdir(tmp_path) == ["run"]


def test_atomic_directory_without_overwrite_rechecks_at_the_rename(tmp_path):
    target = tmp_path / "run"
    with pytest.raises(FileExistsError, match="finished by another run meanwhile"):
        with atomic_directory(target, overwrite=False) as staging:
            (staging / "mine.txt").write_text("mine")
            target.mkdir()  # another run finished here while this one was writing
            (target / "theirs.txt").write_text("theirs")
    assert os.listdir(target) == ["theirs.txt"] and os.listdir(tmp_path) == ["run"]


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_damaged_safetensors_are_named_with_their_role_and_file(tmp_path, damage):
    from adamerge.io.checkpoints import UnreadableInput
    from adamerge.core.coefficients import MergeCoefficients

    path = tmp_path / "expert.safetensors"
    save_file(tensors(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:8] + b"{not json" + data[17:])
    with pytest.raises(UnreadableInput) as error:
        open_weights(path, "expert 'math'")
    message = str(error.value)
    assert message.startswith(f"expert 'math' {path}: cannot read it: ") and "\n" not in message
    with pytest.raises(UnreadableInput, match=rf"^coefficients {path}: cannot read it: "):
        MergeCoefficients.load(path)
