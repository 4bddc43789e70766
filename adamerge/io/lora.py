"""Experts given as PEFT LoRA adapters: a folder with ``adapter_config.json`` and
``adapter_model.safetensors`` (or ``.bin``), as ``PeftModel.save_pretrained`` writes it.

A LoRA expert is ``θ_k = θ_0 + ΔW`` with ``ΔW = s·B·A`` per adapted matrix (Hu et al. 2021),
``s = α/r``, or ``α/√r`` with rsLoRA (Kalajdzievski 2023); ``r``/``α`` may be overridden per
module by ``rank_pattern``/``alpha_pattern``. Its task vector is ``ΔW`` itself, taken in float32,
so a bf16 base does not round it away. Tensors saved whole (``modules_to_save``, embedding
layers) replace the base's. Only plain LoRA is read; peft itself is not needed.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from adamerge.io.checkpoints import ADAPTER_CONFIG, LazySafetensors, LazyWeights, reading, torch_load

_PREFIX = "base_model.model."
# key suffix -> (factor, the product is transposed: embeddings store A as [r, vocab])
_FACTORS = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}
# config fields that change what the adapter computes beyond s·B·A: refused when set
_UNSUPPORTED = (
    "use_dora", "lora_bias", "target_parameters", "layer_replication", "trainable_token_indices",
    "alora_invocation_tokens", "use_qalora", "use_bdlora",
)


def is_adapter(source: object) -> bool:
    """A folder holding ``adapter_config.json``, or an adapter already opened on its base."""
    if isinstance(source, LoraExpert):
        return True
    return isinstance(source, (str, os.PathLike)) and (Path(source) / ADAPTER_CONFIG).is_file()


class LoraAdapter(Mapping):
    """``parameter name -> ΔW`` (float32) of one adapter, computed on access from its factors.

    ``full`` holds the names of tensors the adapter saved whole; :meth:`saved` reads one."""

    def __init__(self, folder: str | os.PathLike, role: str = "adapter"):
        self.folder = Path(folder)
        config_file = self.folder / ADAPTER_CONFIG
        with reading(role, self.folder):
            config = json.loads(config_file.read_text())
            self.file, self.tensors = _adapter_tensors(self.folder)
        self.config = _checked_config(config, f"{role} {config_file}")
        self.who = f"{role} {self.file}"
        self.factors: dict[str, dict[str, str]] = {}
        self.transposed: dict[str, bool] = {}
        self.full: dict[str, str] = {}
        for key in self.tensors:
            self._place(key)
        for name, pair in self.factors.items():
            if set(pair) != {"A", "B"}:
                raise ValueError(f"{self.who}: LoRA module {name!r} has only lora_{next(iter(pair))}, not both factors")

    def _place(self, key: str) -> None:
        if not key.startswith(_PREFIX):
            raise KeyError(f"{self.who}: key {key!r} does not start with {_PREFIX!r}: not a PEFT LoRA adapter")
        inner = key[len(_PREFIX):]
        for suffix, (factor, transposed) in _FACTORS.items():
            if inner.endswith(suffix):
                module = inner[: -len(suffix)]
                self.factors.setdefault(module + ".weight", {})[factor] = key
                self.transposed[module + ".weight"] = transposed
                return
        if "lora_" in inner:
            raise KeyError(f"{self.who}: key {key!r} is not a plain LoRA factor (lora_A/lora_B): refused")
        self.full[inner.replace(".base_layer.", ".")] = key

    def scaling(self, name: str) -> float:
        """``s`` of the module owning parameter ``name``: ``α/r`` (or ``α/√r``), pattern overrides first."""
        module = name[: -len(".weight")]
        rank = _by_pattern(self.config.get("rank_pattern") or {}, module, self.config["r"])
        alpha = _by_pattern(self.config.get("alpha_pattern") or {}, module, self.config["lora_alpha"])
        return alpha / (math.sqrt(rank) if self.config.get("use_rslora") else rank)

    def _pair(self, name: str) -> tuple[Tensor, Tensor]:
        pair = self.factors[name]
        a, b = self.tensors[pair["A"]].float(), self.tensors[pair["B"]].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{self.who}: LoRA factors of {name!r} are {tuple(a.shape)} and {tuple(b.shape)}, not B [m, r] · A [r, n]"
            )
        return b, a

    def _is_transposed(self, name: str) -> bool:
        return self.transposed[name] or bool(self.config.get("fan_in_fan_out"))  # Conv1D stores W as [in, out]

    def __getitem__(self, name: str) -> Tensor:
        b, a = self._pair(name)
        delta = b @ a
        return (delta.T if self._is_transposed(name) else delta) * self.scaling(name)

    def low_rank(self, name: str) -> tuple[Tensor, Tensor]:
        """``(left [m, r], right [r, n])`` with ``left @ right`` equal to ``self[name]`` (float32,
        the scaling folded into ``left``): ΔW without ever forming the ``m × n`` matrix."""
        b, a = self._pair(name)
        b = b * self.scaling(name)
        return (a.T, b.T) if self._is_transposed(name) else (b, a)

    def saved(self, name: str) -> Tensor:
        return self.tensors[self.full[name]]

    def __contains__(self, name: object) -> bool:
        return name in self.factors  # Mapping's default would compute ΔW to test membership

    def __iter__(self) -> Iterator[str]:
        return iter(self.factors)

    def __len__(self) -> int:
        return len(self.factors)

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.folder)!r}, {len(self)} adapted, {len(self.full)} saved whole)"


class LoraExpert(LazyWeights):
    """An adapter over its base: ``key -> θ_k`` for every base key, read lazily (``θ_0 + ΔW``
    in the base's dtype where adapted, the saved tensor where saved whole, ``θ_0`` elsewhere),
    and :meth:`delta` ``= θ_k − θ_0`` in float32 without rounding through ``θ_k``."""

    def __init__(self, adapter: LoraAdapter, base: Mapping[str, Tensor]):
        self.adapter, self.base = adapter, base
        for name in [*adapter, *adapter.full]:
            if name not in base:
                raise KeyError(
                    f"{adapter.who}: LoRA key for {name!r} matches no parameter of the pretrained model "
                    f"(PEFT keys are {_PREFIX}<name>; is the pretrained model the one the adapter was trained on?)"
                )
        self._last: tuple[str, Tensor] | None = None  # θ_k's check then τ reads the same ΔW once

    def _lora(self, key: str) -> Tensor:
        if self._last is None or self._last[0] != key:
            delta = self.adapter[key]
            self._last = (key, delta.T if self._flipped(key, delta.shape) else delta)
        return self._last[1]

    def _flipped(self, key: str, shape: tuple[int, ...]) -> bool:
        """ΔW comes out as ``[n, m]`` for an ``[m, n]`` tensor: PEFT orients ΔW by the module's type
        (Conv1D or Linear) whatever fan_in_fan_out says. Any other mismatch is an error."""
        expected = tuple(self.base[key].shape)
        if tuple(shape) == expected:
            return False
        if len(expected) == 2 and tuple(shape) == expected[::-1]:
            return True
        raise ValueError(f"{self.adapter.who}: ΔW of {key!r} is {tuple(shape)}, the pretrained tensor is {expected}")

    def low_rank(self, key: str) -> tuple[Tensor, Tensor] | None:
        """``(left [m, r], right [r, n])`` with ``left @ right == delta(key)`` (float32), for a
        tensor the adapter adapts and does not also save whole; ``None`` where τ is zero."""
        if key in self.adapter.full:
            raise KeyError(f"{self.adapter.who}: {key!r} is saved whole, its τ is not low-rank")
        if key not in self.adapter:
            return None
        left, right = self.adapter.low_rank(key)
        shape = (left.shape[0], right.shape[1])
        return (right.T, left.T) if self._flipped(key, shape) else (left, right)

    def __getitem__(self, key: str) -> Tensor:
        start = self.adapter.saved(key) if key in self.adapter.full else self.base[key]
        if key not in self.adapter:
            return start
        return (start.float() + self._lora(key).to(start.device)).to(start.dtype)

    def delta(self, key: str) -> Tensor:
        reference = self.base[key]
        delta = torch.zeros(reference.shape, dtype=torch.float32, device=reference.device)
        if key in self.adapter.full:
            delta += self.adapter.saved(key).to(reference.device).float() - reference.float()
        if key in self.adapter:
            delta += self._lora(key).to(reference.device)
        return delta

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def __contains__(self, key: object) -> bool:
        return key in self.base

    def __repr__(self) -> str:
        return f"LoraExpert({self.adapter!r})"


def open_adapter(source: str | os.PathLike | LoraExpert, base: Mapping[str, Tensor], role: str = "expert") -> LoraExpert:
    """A LoRA adapter folder as a full expert over ``base`` (an opened LoraExpert passes through);
    errors name ``role``, the file and the field or key."""
    if isinstance(source, LoraExpert):
        return source
    return LoraExpert(LoraAdapter(source, role), base)


def _checked_config(config: dict, file: str) -> dict:
    """Plain LoRA only: refuse other PEFT types, DoRA and every variant whose update is not ``s·B·A``."""
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type is {config.get('peft_type')!r}; only LoRA adapters ('LORA') are read")
    for field in _UNSUPPORTED:
        if config.get(field):
            raise ValueError(f"{file}: {field}={config[field]!r} is not plain LoRA (ΔW = s·B·A); refused")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{file}: bias={config['bias']!r} trains biases the adapter does not save as ΔW; only bias='none' is read")
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), (int, float)) or config[field] <= 0:
            raise ValueError(f"{file}: {field} must be a positive number, got {config.get(field)!r}")
    return config


def _by_pattern(patterns: Mapping[str, float], module: str, default: float) -> float:
    """The first pattern matching the module's name or a dotted tail of it, as PEFT resolves
    ``rank_pattern``/``alpha_pattern``; ``default`` when none does."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return value
    return default


def _adapter_tensors(folder: Path) -> tuple[Path, Mapping[str, Tensor]]:
    safetensors, pickle = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    if safetensors.is_file():
        return safetensors, LazySafetensors([safetensors])
    if pickle.is_file():
        return pickle, torch_load(pickle)
    raise FileNotFoundError(f"{folder} has {ADAPTER_CONFIG} but no adapter_model.safetensors or adapter_model.bin")
