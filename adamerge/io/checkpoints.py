"""Reading model weights safely and writing outputs atomically.

Weights come from an ``nn.Module``, a state dict, a ``.safetensors`` file, a PyTorch
file, or a Hugging Face model directory. Safetensors is always preferred; anything
else goes through ``torch.load(weights_only=True)`` so no pickled code ever runs.
Safetensors sources are opened lazily (memory-mapped), so building task vectors or
scanning a pool of checkpoints holds one tensor of each file at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

WeightsSource = Union[nn.Module, Mapping[str, torch.Tensor], str, os.PathLike]

_SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
_TORCH_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER_CONFIG = "adapter_config.json"  # marks a PEFT adapter folder (see adamerge.io.lora)


class LazyWeights(Mapping):
    """A ``name -> tensor`` mapping that reads (or computes) each tensor on access:
    :func:`open_weights` hands it on as it is, without touching its tensors."""


class LazySafetensors(LazyWeights):
    """A read-only ``name -> tensor`` mapping over one or more safetensors files.

    Tensors are read on access, so only what is used is ever in memory.
    """

    def __init__(self, files: list[Path]):
        self.files = files
        self._where: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    self._where[key] = file
        self._handles: dict[Path, object] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        file = self._where[key]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file].get_tensor(key)

    def close(self) -> None:
        """Unmap the files (pages read so far stop counting as this process's memory)."""
        self._handles.clear()

    def __contains__(self, key: object) -> bool:
        # Mapping's default would read the tensor from disk just to test membership
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __repr__(self) -> str:
        return f"LazySafetensors({[str(f) for f in self.files]}, {len(self)} tensors)"


def describe(source: WeightsSource) -> str:
    """A short human name for a weights source, used in error messages."""
    if isinstance(source, nn.Module):
        return f"<{type(source).__name__} module>"
    if isinstance(source, Mapping):
        return "<state dict>"
    return str(source)


class UnreadableInput(ValueError):
    """An input file that cannot be read, named with its role and the real cause."""


def _cause(error: BaseException) -> str:
    """The real reason behind a reader's error, in one line."""
    while type(error).__name__ == "DatasetGenerationError" and error.__cause__ is not None:
        error = error.__cause__  # datasets' wrapper; the reader's own error says what is wrong
    text = str(error).strip()
    if isinstance(error, (EOFError, StopIteration)) or not text:
        return f"{type(error).__name__}: the file is empty or cut short"
    if "Weights only load failed" in text:
        detail = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), text.splitlines()[-1].strip())
        return f"it holds more than tensors and plain values, refused (weights_only) so that no pickled code runs ({detail})"
    return f"{type(error).__name__}: {text.splitlines()[0]}"


_recorded: dict[str, str] | None = None


def record_inputs() -> dict[str, str]:
    """From now on, every existing file or folder read through :func:`reading` lands in the
    returned ``path -> role`` dict (a run's provenance); a new call starts a new record."""
    global _recorded
    _recorded = {}
    return _recorded


@contextlib.contextmanager
def reading(role: str, path: str | os.PathLike) -> Iterator[None]:
    """Read an input inside this: any reader's error becomes one line naming the role (expert,
    pretrained, task data, coefficients, checkpoint), the file and the cause. Errors that already
    say what is wrong (a missing file, a wrong kind of content) pass through."""
    if _recorded is not None and role != "checkpoint" and Path(path).exists():
        _recorded.setdefault(str(Path(path).resolve()), role)
    try:
        yield
    except (FileNotFoundError, TypeError, UnreadableInput):
        raise
    except Exception as error:
        raise UnreadableInput(f"{role} {path}: cannot read it: {_cause(error)}") from error


def open_weights(source: WeightsSource, role: str = "weights") -> Mapping[str, torch.Tensor]:
    """Return ``name -> tensor`` for any supported source without copying more than needed;
    ``role`` names the source in errors (``pretrained``, ``expert 'math'``)."""
    if isinstance(source, nn.Module):
        return {name: tensor.detach() for name, tensor in source.state_dict().items()}
    if isinstance(source, LazyWeights):
        return source
    if isinstance(source, Mapping):
        for name, tensor in source.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"state dict entry {name!r} is a {type(tensor).__name__}, not a tensor")
        return source
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{role}: no weights at {path}")
    if (path / ADAPTER_CONFIG).is_file():
        raise UnreadableInput(
            f"{role} {path}: a PEFT adapter ({ADAPTER_CONFIG}) holds ΔW, not weights; read it over its pretrained "
            "model (TaskVectors.from_models, or adamerge.io.lora.open_adapter(path, pretrained_weights))"
        )
    with reading(role, path):
        if path.is_dir():
            return _open_directory(path)
        if path.suffix == ".safetensors":
            return LazySafetensors([path])
        return torch_load(path)


def _open_directory(path: Path) -> Mapping[str, torch.Tensor]:
    for name in _SAFETENSORS_FILES:
        if (path / name).exists():
            return LazySafetensors(_shard_files(path / name))
    for name in _TORCH_FILES:
        if (path / name).exists():
            merged: dict[str, torch.Tensor] = {}
            for shard in _shard_files(path / name):
                merged.update(torch_load(shard))
            return merged
    raise FileNotFoundError(
        f"{path} holds no model weights: expected one of {_SAFETENSORS_FILES + _TORCH_FILES}"
    )


def _shard_files(path: Path) -> list[Path]:
    if not path.name.endswith(".index.json"):
        return [path]
    index = json.loads(path.read_text())
    return [path.parent / name for name in sorted(set(index["weight_map"].values()))]


def torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict from a PyTorch file, read with ``weights_only=True`` (no pickled code runs)."""
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise TypeError(f"{path} does not hold a flat state dict of tensors")
    return dict(loaded)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A training checkpoint, read with ``weights_only=True`` whatever the environment asks
    (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` only overrides an unset argument)."""
    with reading("checkpoint", path):
        return torch.load(path, map_location="cpu", weights_only=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file atomically and durably (temporary file in the same folder, fsync, rename): a
    full disk or a crash mid-write leaves the previous file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _temporary_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    with _temporary_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _temporary_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def _temporary_path(path: Path) -> Iterator[Path]:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the finished file is not
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place only on success.

    A crash leaves a hidden ``.name.partial-*`` folder, never a ``name`` that looks finished.
    An existing ``path`` is replaced only once the new one is complete, and only with
    ``overwrite`` (checked again at the rename: another run may have finished there meanwhile).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-"))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; the finished folder is not
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} was finished by another run meanwhile; set overwrite=true to replace it")
        if path.exists():
            retired = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, retired / path.name)
            os.replace(staging, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
