"""A model that is never whole in memory: its structure on ``meta``, one stage's tensors at a time.

Block-by-block learning (:mod:`adamerge.learning.progressive`) only ever needs one stage's
weights, so a model far larger than the machine can be merged: its structure is built with every
parameter on the ``meta`` device (no memory; buffers such as rotary tables are computed as usual),
and a stage's tensors are read from the checkpoint's safetensors files (single or sharded,
lazily) when it starts and dropped when it ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import warnings
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from adamerge.core.scope import parameter_aliases


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

    def __init__(self, skeleton: nn.Module, weights: Mapping[str, Tensor], scope: Iterable[str] = (),
                 source: str = "the pretrained checkpoint", device: torch.device | str = "cpu"):
        self.module, self.weights, self.source, self.device = skeleton, weights, source, torch.device(device)
        for module in skeleton.modules():  # buffers (rotary tables, position ids) are real: they go to the device now
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device.type != "meta":
                    module._buffers[name] = buffer.to(self.device)
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
            return torch.zeros(current.shape, dtype=current.dtype, device=self.device)
        return self.weights[self.stored[key]].to(self.device, non_blocking=True)

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
            self._set(key, torch.zeros((), dtype=current.dtype, device=self.device).expand(current.shape))

    def release(self, keys: Iterable[str]) -> None:
        """Drop these tensors back to ``meta`` (buffers are small and kept), unmap the checkpoint
        and hand the memory the stage freed back to the system (:func:`return_freed_memory`)."""
        for key in keys:
            module, attr, is_param = self._owner[key]
            if is_param:
                self._set(key, torch.empty_like(module._parameters[attr], device="meta"))
        if hasattr(self.weights, "close"):
            self.weights.close()
        return_freed_memory()

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


def return_freed_memory() -> bool:
    """Return the C heap's free pages to the system (glibc's ``malloc_trim(0)``); True if any
    were (False also where there is no such call, e.g. macOS or musl).

    Why: glibc keeps freed heap memory for reuse, and a stage's mix of large tensors (its
    weights and task vectors) with small ones (features, activations) leaves that free
    memory in pieces the next stage's allocations do not fit. Measured on a 16-block Llama
    (K = 8): at every stage boundary the live heap was the same 176 MiB while the free but
    still resident part grew 64 -> 156 MiB, so the peak grew with depth. Trimming after
    each stage keeps the resident set to what is in use.
    """
    trim = _malloc_trim()
    return bool(trim is not None and trim(0))


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    library = ctypes.CDLL(name) if name else None
    return getattr(library, "malloc_trim", None)


def _candidates(key: str, prefix: str) -> list[str]:
    names = [key]
    if prefix and key.startswith(prefix + "."):
        names.append(key[len(prefix) + 1 :])
    elif prefix:
        names.append(f"{prefix}.{key}")
    return names
