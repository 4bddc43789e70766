"""Sharded writing and features on disk: shards named as ``from_pretrained`` expects, an index that
lists every written tensor with the total size, no index while a shard is missing; features kept
in memory-mapped files read back equal and are dropped by stage."""

from __future__ import annotations

import json

import pytest
import torch

from adamerge.io.shards import INDEX, FeatureFiles, ShardWriter, shard_name


def test_shard_names_count_from_one():
    assert shard_name(0, 4) == "model-00001-of-00004.safetensors"
    assert shard_name(3, 4) == "model-00004-of-00004.safetensors"


def test_shard_index_lists_every_tensor_with_its_total_size(tmp_path):
    writer = ShardWriter(tmp_path, 2, rename=lambda key: None if key == "skip" else f"m.{key}")
    writer.write(0, {"a": torch.zeros(3), "skip": torch.zeros(5)})
    writer.write(1, {"b": torch.zeros(2, 2, dtype=torch.bfloat16)})
    writer.finish()
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["weight_map"] == {"m.a": "model-00001-of-00002.safetensors", "m.b": "model-00002-of-00002.safetensors"}
    assert index["metadata"]["total_size"] == 3 * 4 + 4 * 2


def test_no_index_while_a_shard_is_missing(tmp_path):
    writer = ShardWriter(tmp_path, 3)
    writer.write(0, {"a": torch.zeros(2)})
    writer.write(2, {"c": torch.zeros(2)})
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003"):
        writer.finish()
    assert not (tmp_path / INDEX).exists()


def test_features_on_disk_read_back_equal_and_are_dropped_by_stage(tmp_path):
    files = FeatureFiles(tmp_path / "features")
    tensor = torch.randn(3, 4, dtype=torch.float32)
    kept = files.keep(tensor, "stage0-t0")
    assert torch.equal(kept, tensor) and kept.dtype == tensor.dtype
    kept.add_(1.0)  # copy-on-write: the file keeps what was written
    on_disk = torch.frombuffer(bytearray((tmp_path / "features" / "stage0-t0.bin").read_bytes()), dtype=torch.float32)
    assert torch.equal(on_disk.view(3, 4), tensor)
    assert torch.equal(files.keep(tensor.to(torch.bfloat16), "stage1-t0"), tensor.to(torch.bfloat16))
    files.drop("stage0")
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == ["stage1-t0.bin"]
