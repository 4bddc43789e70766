"""Streamed weights: a model that is never whole in memory, read and written one stage at a time.

Block-by-block learning (:mod:`adamerge.progressive`) only ever needs one stage's weights, so a
model far larger than the machine can be merged: its structure is built with every parameter
on the ``meta`` device (no memory; buffers such as rotary tables are computed as usual), a
stage's tensors are read from the checkpoint's safetensors files (single or sharded, lazily)
when it starts and dropped when it ends, and the merged model is written shard by shard as a
Hugging Face sharded checkpoint (``model-XXXXX-of-YYYYY.safetensors`` + the index) that
``from_pretrained`` opens. Cached features may live in memory-mapped files instead of memory.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor, nn

from adamerge.checkpoints import save_safetensors, write_text
from adamerge.task_vectors import parameter_aliases

INDEX = "model.safetensors.index.json"


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside hold their parameters on the ``meta`` device (shapes and dtypes, no
    storage); buffers stay real, so tables computed at construction (rotary frequencies,
    position ids) are right. Each parameter is allocated uninitialised for a moment, one at a time."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def state_keys(module: nn.Module) -> list[str]:
    """The module's state dict names (parameters and persistent buffers), tied aliases left out."""
    aliases = parameter_aliases(module)
    return [name for name in module.state_dict(keep_vars=True) if name not in aliases]


class StreamedModel:
    """A skeleton module (parameters on ``meta``) whose tensors are read from ``weights`` (a lazy
    ``name -> tensor`` mapping) when a stage needs them and dropped after.

    Checkpoint names may lack or add the model's base prefix (a ``bert.``-less encoder folder for
    a ``BertForSequenceClassification`` skeleton), as ``from_pretrained`` allows. A tensor the
    checkpoint does not hold is refused inside ``scope`` (the merged tensors); outside it (a
    classifier placeholder each task replaces with its own head) it is zero, with a warning.
    """

    def __init__(self, skeleton: nn.Module, weights: Mapping[str, Tensor], scope: Iterable[str] = (), source: str = "the pretrained checkpoint"):
        self.module, self.weights, self.source = skeleton, weights, source
        self.aliases = parameter_aliases(skeleton)
        self.keys = state_keys(skeleton)
        prefix = getattr(skeleton, "base_model_prefix", "") or ""
        scope = set(scope)
        self.stored: dict[str, str | None] = {}
        missing = []
        for key in self.keys:
            found = next((c for c in _candidates(key, prefix) if c in weights), None)
            if found is None:
                if key in scope:
                    raise KeyError(f"{source} has no tensor {key!r} (a merged tensor)")
                missing.append(key)
            self.stored[key] = found
        if missing:
            warnings.warn(f"{source} lacks {missing}: they start at zero (outside the merge)", stacklevel=2)
        self._owner = {key: self._slot(key) for key in self.keys}
        self._alias_slots = {alias: self._slot(alias) for alias in self.aliases}

    def _slot(self, name: str) -> tuple[nn.Module, str, bool]:
        path, _, attr = name.rpartition(".")
        module = self.module.get_submodule(path) if path else self.module
        return module, attr, attr in module._parameters

    def read(self, key: str) -> Tensor:
        """One tensor as stored (its stored dtype), or zeros where the checkpoint lacks it."""
        if self.stored[key] is None:
            module, attr, is_param = self._owner[key]
            current = (module._parameters if is_param else module._buffers)[attr]
            return torch.zeros(current.shape, dtype=current.dtype)
        return self.weights[self.stored[key]]

    def materialise(self, keys: Iterable[str]) -> None:
        """Put these tensors (canonical names) into the skeleton, their tied aliases too."""
        for key in keys:
            self._set(key, self.read(key))

    def stand_in(self, keys: Iterable[str]) -> None:
        """Put zeros that take no memory (one expanded scalar) in place of these tensors: for
        modules a forward must pass through whose output is then ignored (the embeddings, when
        the head stage runs the whole forward with every block replaced by its cached output)."""
        for key in keys:
            module, attr, is_param = self._owner[key]
            current = (module._parameters if is_param else module._buffers)[attr]
            self._set(key, torch.zeros((), dtype=current.dtype).expand(current.shape))

    def release(self, keys: Iterable[str]) -> None:
        """Drop these tensors back to ``meta`` (buffers are small and kept), and unmap the checkpoint."""
        for key in keys:
            module, attr, is_param = self._owner[key]
            if is_param:
                self._set(key, torch.empty_like(module._parameters[attr], device="meta"))
        if hasattr(self.weights, "close"):
            self.weights.close()

    def _set(self, key: str, tensor: Tensor) -> None:
        module, attr, is_param = self._owner[key]
        if not is_param:
            module._buffers[attr] = tensor
            return
        param = nn.Parameter(tensor, requires_grad=False)
        module._parameters[attr] = param
        for alias, canonical in self.aliases.items():
            if canonical == key:
                alias_module, alias_attr, _ = self._alias_slots[alias]
                alias_module._parameters[alias_attr] = param


def _candidates(key: str, prefix: str) -> list[str]:
    names = [key]
    if prefix and key.startswith(prefix + "."):
        names.append(key[len(prefix) + 1 :])
    elif prefix:
        names.append(f"{prefix}.{key}")
    return names


# ---------------------------------------------------------------------- writing


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
