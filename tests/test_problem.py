"""A merge problem (adamerge.app.problems.problem): the base exporter writes a plain module's
weights as Hugging Face lays out a checkpoint and a streamed run's shards under their exported
names with an index; the checks every kind shares (its pretrained model, its experts)."""

from __future__ import annotations

import json

import pytest
import torch

from adamerge.app.config import ProblemConfig, TaskConfig
from adamerge.app.problems.problem import Exporter, experts_of, load_pretrained, require
from adamerge.io.checkpoints import UnreadableInput, open_weights, save_safetensors


def test_a_plain_module_is_written_in_shards_of_the_size_asked(tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    Exporter().export(module, tmp_path / "one", 10**9)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["model.safetensors"]
    Exporter().export(module, tmp_path / "many", 200)  # each weight matrix alone is over 100 bytes
    shards = sorted(p.name for p in (tmp_path / "many").glob("*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / "many" / "model.safetensors.index.json").is_file()
    for folder in ("one", "many"):
        weights = open_weights(str(tmp_path / folder))
        assert sorted(weights) == sorted(module.state_dict())
        assert all(torch.equal(weights[k], v) for k, v in module.state_dict().items())


class RenamingExporter(Exporter):
    """Drops ``head.*`` and strips ``enc.`` from the rest, as a kind exporting its encoder does."""

    def exported_key(self, key):
        return None if key.startswith("head.") else key.removeprefix("enc.")

    def write_config(self, folder):
        (folder / "config.json").write_text("{}")


def write_shards(folder, shards):
    folder.mkdir()
    for number, tensors in enumerate(shards, start=1):
        save_safetensors(tensors, folder / f"model-{number:05d}-of-{len(shards):05d}.safetensors", metadata={"format": "pt"})


def test_streamed_shards_are_moved_or_renamed_with_an_index(tmp_path):
    a, b, h = torch.randn(3, 2), torch.randn(4), torch.randn(2, 2)
    write_shards(tmp_path / "kept", [{"x": a}, {"y": b}])
    Exporter().export_streamed(tmp_path / "kept", tmp_path / "plain")
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert not list((tmp_path / "kept").iterdir())  # moved, not copied
    weights = open_weights(str(tmp_path / "plain"))
    assert torch.equal(weights["x"], a) and torch.equal(weights["y"], b)

    write_shards(tmp_path / "renamed", [{"enc.x": a}, {"enc.y": b, "head.w": h}])
    RenamingExporter().export_streamed(tmp_path / "renamed", tmp_path / "encoder")
    index = json.loads((tmp_path / "encoder" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}
    assert index["metadata"]["total_size"] == (a.numel() + b.numel()) * 4
    weights = open_weights(str(tmp_path / "encoder"))
    assert sorted(weights) == ["x", "y"] and torch.equal(weights["x"], a) and torch.equal(weights["y"], b)
    assert (tmp_path / "encoder" / "config.json").read_text() == "{}"


# ---------------------------------------------------------------------- the checks every kind shares


def test_load_pretrained_reads_folders_and_hub_ids_and_names_what_is_neither(tmp_path):
    seen = []
    assert load_pretrained(str(tmp_path), lambda name: seen.append(name) or "model") == "model"
    assert load_pretrained("org/model", seen.append) is None
    assert seen == [str(tmp_path), "org/model"]
    for missing in (str(tmp_path / "gone"), "./gone", "~/gone/model"):
        with pytest.raises(FileNotFoundError, match=f"pretrained model {missing} does not exist"):
            load_pretrained(missing, seen.append)
    assert len(seen) == 2


def test_a_pretrained_model_that_cannot_be_read_is_named_with_its_cause(tmp_path):
    def unreadable(path):
        raise OSError(f"{path} does not appear to have a file named config.json.\nCheckout the hub.")

    with pytest.raises(UnreadableInput) as caught:
        load_pretrained(str(tmp_path), unreadable)
    assert str(caught.value) == (f"pretrained model {tmp_path}: cannot read it: OSError: {tmp_path} does not "
                                 "appear to have a file named config.json.")


def test_require_and_experts_of_name_what_is_missing():
    config = ProblemConfig(kind="k", tasks={"a": TaskConfig(expert="ea"), "b": TaskConfig()}, experts={"c": "ec"})
    with pytest.raises(ValueError, match="problem kind 'k' needs 'problem.pretrained'"):
        require(config, "pretrained")
    with pytest.raises(ValueError, match=r"problem kind 'k': task\(s\) \['b'\] need an 'expert'"):
        require(config, "experts")
    with pytest.raises(ValueError, match="at least one entry in 'problem.tasks'"):
        require(ProblemConfig(kind="k"), "tasks")
    assert experts_of(config) == {"a": "ea", "c": "ec"}
    with pytest.raises(ValueError, match="expert 'a' is named both in problem.tasks and problem.experts"):
        experts_of(ProblemConfig(tasks={"a": TaskConfig(expert="ea")}, experts={"a": "x"}))
