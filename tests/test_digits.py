"""The digits zoo (adamerge.zoo.digits): deterministic builds, exact cache reloads, atomic writes.

The default zoo is built once per module (a few seconds on one thread); cache-mechanics tests
use a tiny variant (2 tasks, 16 hidden units, 1 epoch) that builds in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adamerge.zoo import digits
from adamerge.zoo.digits import DEFAULT_TASKS, DigitsBackbone, build_digits_zoo, default_cache_dir

TINY = dict(tasks=("upright", "rotated"), hidden=(16,), features=16, pretrain_epochs=1, finetune_epochs=1)


def all_tensors(zoo) -> dict[str, torch.Tensor]:
    tensors = {f"pretrained.{k}": v for k, v in zoo.pretrained.state_dict().items()}
    for task in zoo.tasks:
        tensors.update({f"expert.{task}.{k}": v for k, v in zoo.experts[task].state_dict().items()})
        tensors.update({f"head.{task}.{k}": v for k, v in zoo.heads[task].state_dict().items()})
        tensors[f"calibration.{task}"] = zoo.calibration[task]
        tensors[f"test_inputs.{task}"] = zoo.test_inputs[task]
        tensors[f"test_labels.{task}"] = zoo.test_labels[task]
        tensors[f"train_inputs.{task}"] = zoo.train_inputs[task]
    return tensors


def assert_same(a, b) -> None:
    ta, tb = all_tensors(a), all_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


@torch.no_grad()
def accuracy(backbone, head, inputs, labels) -> float:
    return (head(backbone(inputs)).argmax(1) == labels).float().mean().item()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny matrices: one thread is fastest, and immune to a busy shared CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cache") / "digits"
    return build_digits_zoo(directory, seed=0), directory


def test_default_zoo_layout(built):
    zoo, directory = built
    assert zoo.task_names == list(DEFAULT_TASKS)
    assert 4 <= len(zoo.tasks) <= 6
    assert zoo.cache_dir == directory
    names = {p.name for p in directory.iterdir()}
    assert names == {"manifest.json", "pretrained.safetensors", "heads.safetensors"} | {
        f"expert_{t}.safetensors" for t in zoo.tasks
    }
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["format"] == digits.FORMAT and manifest["settings"]["seed"] == 0
    assert zoo.pretrained_file.is_file() and all(p.is_file() for p in zoo.expert_files.values())
    fresh = zoo.make_backbone()
    assert isinstance(fresh, DigitsBackbone)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in zoo.pretrained.state_dict().items()
    }
    for task in zoo.tasks:
        sizes = len(zoo.train_inputs[task]) + len(zoo.calibration[task]) + len(zoo.test_inputs[task])
        assert sizes == 1797
        assert zoo.calibration[task].shape[1] == 64 and zoo.calibration[task].dtype == torch.float32
        assert zoo.test_labels[task].dtype == torch.int64
        assert float(zoo.test_inputs[task].min()) >= 0.0 and float(zoo.test_inputs[task].max()) <= 1.0
        assert zoo.heads[task].out_features == zoo.tasks[task].num_classes == 10
    # the domains really differ: same images, different inputs
    assert not torch.equal(zoo.test_inputs["upright"], zoo.test_inputs["rotated"])
    assert torch.allclose(zoo.test_inputs["inverted"], 1 - zoo.test_inputs["upright"])


def test_backbone_accepts_image_shapes(built):
    zoo, _ = built
    flat = zoo.test_inputs["upright"][:5]
    out = zoo.pretrained(flat)
    assert out.shape == (5, zoo.settings.features)
    assert torch.allclose(out.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.equal(zoo.pretrained(flat.view(5, 8, 8)), out)
    assert torch.equal(zoo.pretrained(flat.view(5, 1, 8, 8)), out)


def test_experts_beat_pretrained_on_their_own_task(built):
    zoo, _ = built
    for task in zoo.tasks:
        x, y = zoo.test_inputs[task], zoo.test_labels[task]
        expert = accuracy(zoo.experts[task], zoo.heads[task], x, y)
        pretrained = accuracy(zoo.pretrained, zoo.heads[task], x, y)
        assert expert >= 0.85, (task, expert)
        assert expert >= pretrained + 0.3, (task, expert, pretrained)


def test_build_is_deterministic(built):
    zoo, _ = built
    again = build_digits_zoo(seed=0, cache=False)
    assert again.cache_dir is None
    assert_same(zoo, again)


def test_second_call_loads_from_cache_identically(built, monkeypatch):
    zoo, directory = built

    def no_training(*args, **kwargs):
        raise AssertionError("the cached zoo should have been loaded, not trained again")

    monkeypatch.setattr(digits, "_train_models", no_training)
    reloaded = build_digits_zoo(directory, seed=0)
    assert_same(zoo, reloaded)
    assert not reloaded.pretrained.training and not any(m.training for m in reloaded.experts.values())


def test_seeds_differ():
    a = build_digits_zoo(seed=0, cache=False, **TINY)
    b = build_digits_zoo(seed=1, cache=False, **TINY)
    assert not torch.equal(a.pretrained.layers[0].weight, b.pretrained.layers[0].weight)
    assert not torch.equal(a.test_labels["upright"], b.test_labels["upright"])


def count_trainings(monkeypatch) -> list:
    calls = []
    original = digits._train_models

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(digits, "_train_models", counting)
    return calls


def test_manifest_mismatch_rebuilds(tmp_path, monkeypatch):
    calls = count_trainings(monkeypatch)
    directory = tmp_path / "digits"
    build_digits_zoo(directory, seed=0, **TINY)
    build_digits_zoo(directory, seed=0, **TINY)
    assert len(calls) == 1  # cached
    other = build_digits_zoo(directory, seed=1, **TINY)
    assert len(calls) == 2
    assert json.loads((directory / "manifest.json").read_text())["settings"]["seed"] == 1
    changed = dict(TINY, finetune_epochs=2)
    build_digits_zoo(directory, seed=1, **changed)
    assert len(calls) == 3
    build_digits_zoo(directory, seed=1, rebuild=True, **changed)
    assert len(calls) == 4
    assert other.settings.seed == 1


def test_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    directory = tmp_path / "digits"
    first = build_digits_zoo(directory, seed=0, **TINY)
    (directory / "expert_rotated.safetensors").unlink()
    calls = count_trainings(monkeypatch)
    second = build_digits_zoo(directory, seed=0, **TINY)
    assert len(calls) == 1
    assert (directory / "expert_rotated.safetensors").is_file()
    assert_same(first, second)
    (directory / "manifest.json").write_text("{not json")
    build_digits_zoo(directory, seed=0, **TINY)
    assert len(calls) == 2


def fail_on_third_save(monkeypatch):
    original = digits.save_safetensors
    saved = []

    def flaky(tensors, path, metadata=None):
        if len(saved) == 2:
            raise KeyboardInterrupt("interrupted while writing")
        saved.append(Path(path).name)
        original(tensors, path, metadata=metadata)

    monkeypatch.setattr(digits, "save_safetensors", flaky)
    return saved


def test_interrupted_write_leaves_nothing_finished_looking(tmp_path, monkeypatch):
    directory = tmp_path / "cache" / "digits"
    saved = fail_on_third_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        build_digits_zoo(directory, seed=0, **TINY)
    assert len(saved) == 2  # some files had been written...
    assert not directory.exists()  # ...but never under the final name
    assert not list(directory.parent.glob("*/manifest.json"))
    assert not [p for p in directory.parent.iterdir() if not p.name.startswith(".")]

    monkeypatch.undo()
    calls = count_trainings(monkeypatch)
    build_digits_zoo(directory, seed=0, **TINY)
    assert len(calls) == 1 and (directory / "manifest.json").is_file()


def test_interrupted_rebuild_keeps_the_old_cache(tmp_path, monkeypatch):
    directory = tmp_path / "digits"
    old = build_digits_zoo(directory, seed=0, **TINY)
    fail_on_third_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        build_digits_zoo(directory, seed=0, rebuild=True, **TINY)
    monkeypatch.undo()
    calls = count_trainings(monkeypatch)
    assert_same(old, build_digits_zoo(directory, seed=0, **TINY))
    assert not calls


def test_killed_build_leftovers_are_ignored(tmp_path, monkeypatch):
    # a process killed mid-write (no cleanup) leaves only a hidden staging folder behind
    directory = tmp_path / "digits"
    leftover = tmp_path / ".digits.partial-abc123"
    leftover.mkdir()
    (leftover / "pretrained.safetensors").write_bytes(b"half a file")
    calls = count_trainings(monkeypatch)
    build_digits_zoo(directory, seed=0, **TINY)
    assert len(calls) == 1 and (directory / "manifest.json").is_file()


def test_datasets_conversion(built):
    pytest.importorskip("datasets")
    zoo, _ = built
    test = zoo.dataset("rotated", "test")
    assert set(test.column_names) == {"pixels", "label"}
    assert len(test) == len(zoo.test_labels["rotated"])
    assert len(test[0]["pixels"]) == 64 and test[0]["label"] == int(zoo.test_labels["rotated"][0])
    assert torch.allclose(torch.tensor(test[0]["pixels"]), zoo.test_inputs["rotated"][0])
    calibration = zoo.dataset("rotated", "calibration")
    assert calibration.column_names == ["pixels"]  # unlabelled
    assert len(calibration) == len(zoo.calibration["rotated"])
    validation = zoo.dataset("rotated", "validation")  # the calibration images, labelled
    assert validation["pixels"] == calibration["pixels"]
    assert validation["label"] == zoo.calibration_labels["rotated"].tolist()
    assert set(zoo.calibration_labels["rotated"].tolist()) == set(range(10))
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        zoo.dataset("rotated", "holdout")
    with pytest.raises(KeyError, match="unknown task"):
        zoo.dataset("nope")


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAMERGE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "zoo" / "digits"
    monkeypatch.delenv("ADAMERGE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "adamerge" / "zoo" / "digits"


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown digits task"):
        build_digits_zoo(cache=False, tasks=["upright", "sideways"])
    with pytest.raises(ValueError, match="unique"):
        build_digits_zoo(cache=False, tasks=["upright", "upright"])
    with pytest.raises(TypeError, match="unknown digits zoo setting"):
        build_digits_zoo(cache=False, epochs=3)


def test_build_restores_thread_count():
    before = torch.get_num_threads()
    build_digits_zoo(cache=False, **TINY)
    assert torch.get_num_threads() == before
