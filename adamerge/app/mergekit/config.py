"""Reading a mergekit YAML (``linear``, ``task_arithmetic``, ``ties``, ``dare_linear``,
``dare_ties``) and resolving its settings, in one place.

Every parameter is resolved per tensor as mergekit 0.1.5 resolves it: a model's own settings before
the top-level ones, the first ``filter`` that is a substring of the tensor's name, gradients
interpolated over the layer position. What adamerge makes of the result is :mod:`.methods`' table.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adamerge.app.mergekit.methods import (
    COEFFICIENT_METHODS,
    DARE_NOTE,
    MERGEKIT_PARAMETERS,
    Resolved,
    coefficients,
    from_mergekit,
)
from adamerge.core.granularities import block_of
from adamerge.io.checkpoints import LazySafetensors, open_weights

TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "chat_template")
PER_MODEL = ("weight", "density")


def _number_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def _setting(value, tensor: str, t: float | None, where: str):
    """One parameter's value for one tensor, as mergekit reads a setting: a scalar; a gradient (numbers
    interpolated over the layer position ``t``); or ``{filter, value}`` items, the first whose filter is a
    substring of the tensor's name (none or ``*``: every tensor) — None when no item matches."""
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, (bool, int, float)):
        return value
    if _number_list(value):
        if t is None:
            raise ValueError(f"{where}: a gradient needs one stack of numbered layers; this model has several")
        scaled = t * (len(value) - 1)
        low = int(scaled)
        high = min(len(value) - 1, low + 1)
        return (1 - (scaled - low)) * value[low] + (scaled - low) * value[high]
    if isinstance(value, list) and all(isinstance(v, Mapping) for v in value):
        for i, item in enumerate(value):
            if "value" not in item or set(item) - {"value", "filter"}:
                raise ValueError(f"{where}[{i}]: expected {{filter, value}}, got {dict(item)}")
            if item.get("filter") in (None, "*") or item["filter"] in tensor:
                return _setting(item["value"], tensor, t, f"{where}[{i}].value")
        return None
    raise ValueError(f"{where}: {value!r} is not a number, a boolean, a list of numbers or a list of {{filter, value}}")


def _positions(keys: list[str]) -> dict[str, float | None]:
    """mergekit's ``t`` per tensor: ``i/(n−1)`` in layer ``i`` of ``n`` (1 with one layer), 0 outside the
    layers; None everywhere when the numbered blocks form more than one stack (no single ``t``)."""
    blocks = {k: block_of(k) for k in keys}
    stacks = {b.rsplit(".", 1)[0] for b in blocks.values() if b}
    if len(stacks) > 1:
        return dict.fromkeys(keys)
    count = len({b for b in blocks.values() if b})
    return {k: (int(b.rsplit(".", 1)[1]) / (count - 1) if count > 1 else 1.0) if b else 0.0 for k, b in blocks.items()}


def _resolve(name: str, sources: list[tuple[str, Mapping | None]], tensor: str, t, default):
    """The first setting of ``name`` (highest precedence first) with a value for this tensor, else ``default``."""
    for where, settings in sources:
        if settings and name in settings:
            value = _setting(settings[name], tensor, t, f"{where}.{name}")
            if value is not None:
                return value
    if default is None:
        raise ValueError(f"{sources[0][0]}: no `{name}` for tensor {tensor} (mergekit requires one)")
    return default


def _float_shapes(source: str) -> dict[str, tuple[int, ...]]:
    """The shape of each floating-point tensor of a checkpoint, from the file headers where it can."""
    weights = open_weights(source, "base_model")
    if not isinstance(weights, LazySafetensors):
        return {k: tuple(v.shape) for k, v in weights.items() if v.is_floating_point()}
    from safetensors import safe_open

    shapes = {}
    for file in weights.files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                if piece.get_dtype().startswith(("F", "BF")):
                    shapes[key] = tuple(piece.get_shape())
    return shapes


def expert_names(paths: list[str]) -> list[str]:
    """File-safe, distinct names for the models (their folder names)."""
    names = []
    for path in paths:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path).name).strip(".") or "expert"
        names.append(name if name not in names else f"{name}_{len(names)}")
    return names


@dataclass
class MergekitMerge:
    """A mergekit YAML resolved per tensor in adamerge's terms: the pretrained model, the experts
    (name → path), the shapes of the tensors mergekit merges, and ``terms``: each expert's weight
    per tensor and the method's parameters (:class:`.methods.Resolved`)."""

    where: str
    base: str
    experts: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    terms: Resolved
    notes: list[str] = field(default_factory=list)

    def data_free(self) -> tuple[str, dict]:
        """The registered adamerge method and arguments that merge what mergekit merges."""
        return from_mergekit(self.terms)

    def initial(self) -> torch.Tensor:
        """``[K, tensors]`` starting coefficients of a learned merge equal to this one."""
        if self.terms.method not in COEFFICIENT_METHODS:
            raise ValueError(f"{self.where}: merge_method {self.terms.method}: a learned merge starts from task-arithmetic "
                             "coefficients, which trimmed, sign-elected or dropped deltas are not: use linear or task_arithmetic")
        return self.terms.values


def _load(path: str | Path) -> tuple[str, dict]:
    """The YAML's mapping, its top-level keys checked."""
    import yaml

    where, path = str(path), Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"mergekit config {where} not found")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a mergekit config (a mapping with merge_method and models)")
    for key in config:
        if key not in TOP_KEYS:
            raise ValueError(f"{where}: `{key}` has no adamerge equivalent (adamerge reads {', '.join(TOP_KEYS)})")
    if config.get("merge_method") not in MERGEKIT_PARAMETERS:
        raise ValueError(f"{where}: merge_method {config.get('merge_method')!r}: adamerge reads {', '.join(MERGEKIT_PARAMETERS)}")
    return where, config


def read_mergekit(path: str | Path) -> MergekitMerge:
    """Read a mergekit YAML, resolving every parameter per tensor of the base checkpoint as mergekit does."""
    where, config = _load(path)
    method, base = config["merge_method"], config.get("base_model")
    defaults = MERGEKIT_PARAMETERS[method]
    notes = _top_level_notes(config, where)
    top = (f"{where}: parameters", config.get("parameters") or {})
    unknown = sorted(set(top[1]) - set(defaults) - set(PER_MODEL))
    if unknown:
        raise ValueError(f"{where}: parameters.{unknown[0]}: mergekit's {method} does not take it")
    inputs = _inputs(config, method, where)
    if method == "linear" and base is not None and base not in [m for m, _ in inputs]:
        inputs.append((base, (f"{where}: base_model", {})))  # mergekit adds it, weighted by the top-level parameters
    reference = base if base is not None else inputs[0][0]
    if method != "linear" and base is None:
        raise ValueError(f"{where}: base_model: mergekit's {method} needs one")
    shapes = _float_shapes(reference)
    positions = _positions(list(shapes))
    weights = torch.zeros(len(inputs), len(shapes), dtype=torch.float64)
    density = torch.ones_like(weights)
    shared = {name: set() for name in defaults if name != "density"}
    for i, key in enumerate(shapes):
        for j, (_, own) in enumerate(inputs):
            weights[j, i] = _numeric(_resolve("weight", [own, top], key, positions[key], None), own[0] + ".weight")
            if "density" in defaults:
                density[j, i] = _numeric(_resolve("density", [own, top], key, positions[key], 1.0), own[0] + ".density")
        for name in shared:
            shared[name].add(_resolve(name, [top], key, positions[key], defaults[name]))
    for name, seen in shared.items():
        if len(seen) > 1:
            raise ValueError(f"{where}: parameters.{name} varies over tensors; adamerge reads one value")
    shared = {name: seen.pop() for name, seen in shared.items()}
    if shared.get("int8_mask"):
        notes.append("parameters.int8_mask ignored: it changes how mergekit stores its sign mask, not the merge")
    if method.startswith("dare"):
        notes.append(DARE_NOTE)
    keep = [j for j, (model, _) in enumerate(inputs) if model != reference]
    values = coefficients(method, weights, shared, where)[keep]
    experts = dict(zip(expert_names([inputs[j][0] for j in keep]), [inputs[j][0] for j in keep]))
    numels = {key: math.prod(shape) for key, shape in shapes.items()}
    terms = Resolved(where, method, list(experts), values, density[keep], shared, numels)
    return MergekitMerge(where, reference, experts, shapes, terms, notes)


def _inputs(config: Mapping, method: str, where: str) -> list[tuple[str, tuple[str, Mapping]]]:
    """``(model, (where, its parameters))`` per merged model; for task-vector methods, the base left out."""
    models = config.get("models")
    if not isinstance(models, list) or not models:
        raise ValueError(f"{where}: models: expected a list of {{model, parameters}} (slices and modules are not read)")
    allowed = [name for name in PER_MODEL if name == "weight" or name in MERGEKIT_PARAMETERS[method]]
    inputs = []
    for i, entry in enumerate(models):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("model"), str) or set(entry) - {"model", "parameters"}:
            raise ValueError(f"{where}: models[{i}]: expected {{model: <path or hub id>, parameters: {{...}}}}")
        own = entry.get("parameters") or {}
        unknown = sorted(set(own) - set(allowed))
        if unknown:
            raise ValueError(f"{where}: models[{i}].parameters.{unknown[0]}: mergekit's {method} takes {allowed} per model")
        if method == "linear" or entry["model"] != config.get("base_model"):
            inputs.append((entry["model"], (f"{where}: models[{i}].parameters", own)))
    return inputs


def _numeric(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _top_level_notes(config: Mapping, where: str) -> list[str]:
    """What adamerge does with mergekit's dtype and tokenizer settings; refuses a changed vocabulary."""
    notes = []
    if config.get("tokenizer_source") not in (None, "base"):
        raise ValueError(f"{where}: tokenizer_source {config['tokenizer_source']!r} changes the vocabulary; adamerge keeps the base's")
    for key in ("dtype", "out_dtype"):
        dtype = config.get(key)
        if dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"{where}: {key} {dtype!r}: expected float32, bfloat16 or float16")
        if dtype in ("bfloat16", "float16"):
            notes.append(f"{key} {dtype}: adamerge merges in float32 and saves the base model's dtype; "
                         f"the merges agree up to {dtype} rounding")
    if config.get("chat_template") is not None:
        notes.append("chat_template ignored: the merged model keeps the base's tokenizer files")
    return notes
