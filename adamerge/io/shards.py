"""Sharded safetensors written one piece at a time, and features kept in memory-mapped files.

The merged model of a streamed run is written shard by shard as a Hugging Face sharded
checkpoint (``model-XXXXX-of-YYYYY.safetensors`` + ``model.safetensors.index.json``) that
``from_pretrained`` opens, so it never exists whole in memory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from adamerge.io.checkpoints import save_safetensors, write_text

INDEX = "model.safetensors.index.json"


def shard_name(number: int, total: int) -> str:
    return f"model-{number + 1:05d}-of-{total:05d}.safetensors"


class ShardWriter:
    """Writes a model one shard at a time into ``folder``, then the index ``from_pretrained`` reads.

    Each shard is written atomically, so a rerun rewrites (or keeps) whole shards only; the index
    is made from the shards' own headers, so it also covers shards an earlier run wrote.
    """

    def __init__(self, folder: str | Path, total: int, rename: Callable[[str], str | None] = lambda key: key):
        self.folder, self.total, self.rename = Path(folder), total, rename

    def write(self, number: int, tensors: Mapping[str, Tensor]) -> None:
        named = {}
        for key, tensor in tensors.items():
            name = self.rename(key)
            if name is not None:
                named[name] = tensor
        save_safetensors(named, self.folder / shard_name(number, self.total), metadata={"format": "pt"})

    def finish(self) -> dict[str, str]:
        """Write ``model.safetensors.index.json`` over every shard; returns its weight map."""
        weight_map, total_size = {}, 0
        for number in range(self.total):
            file = self.folder / shard_name(number, self.total)
            if not file.exists():
                raise FileNotFoundError(f"shard {file} was never written: the streamed run did not reach its stage")
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    weight_map[key] = file.name
                    piece = handle.get_slice(key)
                    total_size += int(np.prod(piece.get_shape(), dtype=np.int64)) * _itemsize(piece.get_dtype())
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        write_text(self.folder / INDEX, json.dumps(index, indent=1))
        return weight_map


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _itemsize(dtype: str) -> int:
    return _ITEMSIZE.get(dtype, int(re.sub(r"\D", "", dtype) or 8) // 8)


# ---------------------------------------------------------------------- features on disk


class FeatureFiles:
    """Cached features kept in memory-mapped files under ``folder`` instead of memory.

    ``keep(tensor, name)`` writes the tensor's bytes and returns a tensor backed by the file
    (copy-on-write, so reading it never changes the file); ``drop(prefix)`` removes a finished
    stage's files.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def keep(self, tensor: Tensor, name: str) -> Tensor:
        path = self.folder / f"{name}.bin"
        flat = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        flat.tofile(path)
        mapped = np.memmap(path, dtype=np.uint8, mode="c", shape=flat.shape)
        return torch.from_numpy(mapped).view(tensor.dtype).view(tensor.shape)

    def drop(self, prefix: str) -> None:
        for path in self.folder.glob(f"{prefix}*.bin"):
            path.unlink(missing_ok=True)
