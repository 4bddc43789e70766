"""mergekit in: a mergekit YAML (``linear``, ``task_arithmetic``, ``ties``, ``dare_linear``,
``dare_ties``) as an adamerge recipe, for ``adamerge merge|fit --from-mergekit``.

Every parameter is resolved per tensor as mergekit 0.1.5 resolves it (a model's own settings before
the top-level ones, the first ``filter`` that is a substring of the tensor's name, gradients
interpolated over the layer position), then turned into the equal adamerge merge (a data-free
``method``, or the coefficients' ``init`` of a learned one), or refused with the key that has no
equal: never a different merge in silence.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from adamerge.app.config import load_recipe, resolve_recipe, to_plain
from adamerge.app.mergekit import DARE_NOTE, trim_note
from adamerge.core.coefficients import MergeCoefficients
from adamerge.core.granularities import block_of
from adamerge.core.layouts import build_layout
from adamerge.io.checkpoints import LazySafetensors, open_weights


# mergekit method -> the parameters it reads and their defaults (mergekit/merge_methods/registry.py, linear.py)
METHODS = {
    "linear": {"normalize": True},
    "task_arithmetic": {"normalize": False, "rescale": False, "lambda": 1.0, "int8_mask": False, "density": 1.0},
    "ties": {"normalize": True, "rescale": False, "lambda": 1.0, "int8_mask": False, "density": 1.0},
    "dare_linear": {"normalize": False, "rescale": True, "lambda": 1.0, "int8_mask": False, "density": 1.0},
    "dare_ties": {"normalize": False, "rescale": True, "lambda": 1.0, "int8_mask": False, "density": 1.0},
}
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
    (name → path) and ``values[k, i]``, expert k's weight on tensor ``keys[i]``: a task-arithmetic
    coefficient for linear and task_arithmetic, mergekit's own weight for ties and DARE."""

    where: str
    method: str
    base: str
    experts: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    values: torch.Tensor
    density: torch.Tensor
    shared: dict
    notes: list[str] = field(default_factory=list)

    def data_free(self) -> tuple[str, dict]:
        """The registered adamerge method and arguments that merge what mergekit merges."""
        if self.method in ("linear", "task_arithmetic"):
            varying = [n for n, row in zip(self.experts, self.values) if (row - row[0]).abs().max() > 1e-12]
            if varying:
                raise ValueError(f"{self.where}: the weight of {varying[0]} varies over tensors, and a data-free adamerge method "
                                 "takes one per expert: start `adamerge fit --from-mergekit` from it instead")
            return "task_arithmetic", {"scaling": [float(row[0]) for row in self.values]}
        weight, density, lam = float(self.values[0, 0]), float(self.density[0, 0]), float(self.shared["lambda"])
        if (self.values - weight).abs().max() > 1e-12 or weight <= 0:
            raise ValueError(f"{self.where}: models[*].parameters.weight: adamerge's {self.method} weighs every expert "
                             "equally: give all the same positive weight everywhere")
        if (self.density - density).abs().max() > 1e-12:
            raise ValueError(f"{self.where}: models[*].parameters.density: adamerge's {self.method} takes one density")
        if self.shared["rescale"] != self.method.startswith("dare"):
            raise ValueError(f"{self.where}: parameters.rescale: {self.shared['rescale']} has no adamerge equal for {self.method}")
        if self.method == "dare_linear":
            scaling = lam / len(self.experts) if self.shared["normalize"] else lam * weight  # λ Σ w τ / (K w or 1)
            return "dare", {"density": density, "scaling": scaling}
        if not self.shared["normalize"]:
            raise ValueError(f"{self.where}: parameters.normalize: false makes mergekit's {self.method} add the agreeing "
                             "deltas undivided; adamerge's divides by their count (normalize: true with equal weights)")
        if self.method == "dare_ties":
            return "dare", {"density": density, "scaling": lam, "sign_election": True}
        differ = trim_note(density, {k: math.prod(s) for k, s in self.shapes.items()})
        if differ:
            raise ValueError(f"{self.where}: models[*].parameters.density: {differ}")
        return "ties", {"density": density, "scaling": lam, "trim_scope": "tensor", "sign_method": "sum"}

    def initial(self) -> torch.Tensor:
        """``[K, tensors]`` starting coefficients of a learned merge equal to this one."""
        if self.method not in ("linear", "task_arithmetic"):
            raise ValueError(f"{self.where}: merge_method {self.method}: a learned merge starts from task-arithmetic "
                             "coefficients, which trimmed, sign-elected or dropped deltas are not: use linear or task_arithmetic")
        return self.values


def read_mergekit(path: str | Path) -> MergekitMerge:
    """Read a mergekit YAML, resolving every parameter per tensor of the base checkpoint as mergekit does."""
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
    method, base = config.get("merge_method"), config.get("base_model")
    if method not in METHODS:
        raise ValueError(f"{where}: merge_method {method!r}: adamerge reads {', '.join(METHODS)}")
    notes = _top_level_notes(config, where)
    top = (f"{where}: parameters", config.get("parameters") or {})
    unknown = sorted(set(top[1]) - set(METHODS[method]) - set(PER_MODEL))
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
    shared = {name: set() for name in METHODS[method] if name != "density"}
    for i, key in enumerate(shapes):
        for j, (_, own) in enumerate(inputs):
            weights[j, i] = _numeric(_resolve("weight", [own, top], key, positions[key], None), own[0] + ".weight")
            if method != "linear":
                density[j, i] = _numeric(_resolve("density", [own, top], key, positions[key], 1.0), own[0] + ".density")
        for name in shared:
            shared[name].add(_resolve(name, [top], key, positions[key], METHODS[method][name]))
    for name, seen in shared.items():
        if len(seen) > 1:
            raise ValueError(f"{where}: parameters.{name} varies over tensors; adamerge reads one value")
    shared = {name: seen.pop() for name, seen in shared.items()}
    if shared.get("int8_mask"):
        notes.append("parameters.int8_mask ignored: it changes how mergekit stores its sign mask, not the merge")
    if method.startswith("dare"):
        notes.append(DARE_NOTE)
    keep = [j for j, (model, _) in enumerate(inputs) if model != reference]
    values = _coefficients(method, weights, shared, where)[keep]
    experts = dict(zip(expert_names([inputs[j][0] for j in keep]), [inputs[j][0] for j in keep]))
    return MergekitMerge(where, method, reference, experts, shapes, values, density[keep], shared, notes)


def _inputs(config: Mapping, method: str, where: str) -> list[tuple[str, tuple[str, Mapping]]]:
    """``(model, (where, its parameters))`` per merged model; for task-vector methods, the base left out."""
    models = config.get("models")
    if not isinstance(models, list) or not models:
        raise ValueError(f"{where}: models: expected a list of {{model, parameters}} (slices and modules are not read)")
    inputs = []
    for i, entry in enumerate(models):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("model"), str) or set(entry) - {"model", "parameters"}:
            raise ValueError(f"{where}: models[{i}]: expected {{model: <path or hub id>, parameters: {{...}}}}")
        own = entry.get("parameters") or {}
        allowed = ("weight",) if method == "linear" else PER_MODEL
        unknown = sorted(set(own) - set(allowed))
        if unknown:
            raise ValueError(f"{where}: models[{i}].parameters.{unknown[0]}: mergekit's {method} takes {list(allowed)} per model")
        if method == "linear" or entry["model"] != config.get("base_model"):
            inputs.append((entry["model"], (f"{where}: models[{i}].parameters", own)))
    return inputs


def _numeric(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _coefficients(method: str, weights: torch.Tensor, shared: Mapping, where: str) -> torch.Tensor:
    """Each input's task-arithmetic coefficient per tensor (linear, task_arithmetic; mergekit's
    ``generalized_task_arithmetic.py`` and ``linear.py``), or its weight as given (ties, DARE)."""
    total = weights.sum(dim=0)
    if method == "linear":  # Σ w_i θ_i / Σ w_i = θ_ref + Σ_i (w_i / Σ w) (θ_i − θ_ref) when the factors sum to 1
        if shared["normalize"]:
            if (total == 0).any():
                raise ValueError(f"{where}: models[*].parameters.weight: the weights sum to 0 on some tensor")
            return weights / total
        if (total - 1).abs().max() > 1e-6:
            raise ValueError(f"{where}: parameters.normalize: false: linear's weights must then sum to 1 on every tensor "
                             "(adamerge merges differences from a base)")
        return weights
    if method == "task_arithmetic":
        divisor = torch.where(total.abs() < 1e-8, 1.0, total) if shared["normalize"] else torch.ones_like(total)
        return shared["lambda"] * weights / divisor
    return weights


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


CAUSAL_LM = ("ForCausalLM", "LMHeadModel")


def merge_recipe(path: str | Path, overrides: Sequence[str] = ()) -> tuple[DictConfig, list[str]]:
    """The data-free recipe that merges what mergekit merges from ``path``, and notes to show."""
    merge = read_mergekit(path)
    method, args = merge.data_free()
    config = Path(merge.base).expanduser() / "config.json"
    if config.is_file():
        architectures = json.loads(config.read_text()).get("architectures") or []
        if not any(a.endswith(CAUSAL_LM) for a in architectures):
            raise ValueError(f"{merge.where}: base_model {merge.base} is {architectures}, not a causal LM; "
                             "for other models write a recipe (`adamerge init`)")
    recipe = {
        "name": expert_names([Path(path).stem])[0],
        "method": {"name": method, "args": args},
        "problem": {"kind": "hf_causal_lm", "pretrained": merge.base,
                    "tasks": {name: {"expert": p} for name, p in merge.experts.items()}},
    }
    return load_recipe(recipe, list(overrides)), merge.notes


def _same(one: str, other: str) -> bool:
    """Two model references name the same model (the same folder, or the same hub id)."""
    a, b = Path(one).expanduser(), Path(other).expanduser()
    return a.resolve() == b.resolve() if a.exists() and b.exists() else one == other


def fit_recipe(path: str | Path, source: str, overrides: Sequence[str] = ()) -> tuple[DictConfig, list[str]]:
    """``source`` started from ``path``'s weights: its pretrained model must be the YAML's base and its
    experts among the YAML's models (the others join as experts without a task). Weights that vary over
    tensors start layer/chunk/element-wise coefficients from a file beside the run directory."""
    merge = read_mergekit(path)
    values = merge.initial()
    plain = to_plain(load_recipe(resolve_recipe(source), list(overrides)))
    problem = plain["problem"]
    if problem["pretrained"] is None:
        problem["pretrained"] = merge.base
    elif not _same(problem["pretrained"], merge.base):
        raise ValueError(f"problem.pretrained {problem['pretrained']} is not {merge.where}'s base model {merge.base}")
    ours = {**{n: t["expert"] for n, t in problem["tasks"].items() if t.get("expert")}, **problem["experts"]}
    paths = list(merge.experts.values())
    rows = {}
    for name, expert in ours.items():
        match = [k for k, p in enumerate(paths) if _same(expert, p)]
        if not match:
            raise ValueError(f"problem expert {name!r} ({expert}) is not among {merge.where}'s models")
        rows[name] = match[0]
    for k, name in enumerate(merge.experts):
        if k not in rows.values():
            name = name if name not in rows else f"{name}_mergekit"
            problem["experts"][name], rows[name] = paths[k], k
    init = values[list(rows.values())]
    plain["coefficients"]["init"] = _init(merge, init, list(rows), plain)
    return load_recipe(plain), merge.notes


def _init(merge: MergekitMerge, init: torch.Tensor, names: list[str], plain: dict):
    """One value per expert where the weights are constant over tensors, else a layer-wise coefficients
    file that ``coefficients.init`` transfers exactly to layer, chunk and element-wise coefficients."""
    if (init - init[:, :1]).abs().max() <= 1e-12:
        return {name: float(row[0]) for name, row in zip(names, init)}
    granularity = plain["coefficients"]["granularity"]
    if granularity not in ("layer", "chunk", "element"):
        raise ValueError(f"coefficients.granularity {granularity}: {merge.where}'s weights vary over tensors, which "
                         f"{granularity}-wise coefficients cannot start from exactly; use layer, chunk or element")
    layout = build_layout(names, merge.shapes, "layer")
    values = torch.zeros(len(names), layout.num_slots)
    for i, key in enumerate(merge.shapes):
        values[:, layout.tensor_slots[key][0]] = init[:, i].float()
    run_dir = Path(plain["output_dir"]).expanduser()
    file = run_dir.with_name(run_dir.name + ".mergekit-init.safetensors")
    file.parent.mkdir(parents=True, exist_ok=True)
    MergeCoefficients(layout, init=values).save(file)
    return str(file)
