"""mergekit in and out (arcee-ai/mergekit, its YAML schema as of 0.1.5).

Out: ``mergekit.yaml`` reproducing a run's merge where mergekit can (task/layer/group-wise learned
coefficients, and the data-free methods both tools have), ``mergekit.txt`` saying why not or what differs.

In: a mergekit YAML (``linear``, ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``) as an
adamerge recipe, for ``adamerge merge|fit --from-mergekit``. Every parameter is resolved per tensor as
mergekit resolves it (a model's own settings before the top-level ones, the first ``filter`` that is a
substring of the tensor's name, gradients interpolated over the layer position), then turned into the
equal adamerge merge, or refused with the key that has no equal: never a different merge in silence.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from adamerge.app.config import to_plain
from adamerge.app.problem import MergeProblem
from adamerge.core.coefficients import MergeCoefficients
from adamerge.core.element import ElementCoefficients
from adamerge.core.layouts import block_of
from adamerge.core.task_vectors import in_scope
from adamerge.core.tensor_ops import keep_count
from adamerge.io.checkpoints import LazySafetensors, open_weights, write_text
from adamerge.methods import get_method

Coefficients = MergeCoefficients | ElementCoefficients


# ---------------------------------------------------------------------- out


class _NoMergekit(Exception):
    """Why a merge has no mergekit config."""


def _checkpoints(problem: MergeProblem, keys: list[str]) -> tuple[str, dict[str, str], str]:
    """The base and expert checkpoints mergekit reads, and a note on tensors outside the merge whose
    shapes differ between them (task heads), which mergekit cannot merge."""
    base = problem.description.get("base")
    experts = problem.description.get("experts", {})
    if not isinstance(base, str) or not all(isinstance(p, str) for p in experts.values()):
        raise _NoMergekit("the base model and experts are not all checkpoints on disk")
    try:
        base_weights = open_weights(base, "pretrained")
        if not set(keys) <= set(base_weights):
            raise _NoMergekit(
                "the merged tensors are named differently in the base checkpoint (e.g. a bare encoder as the base of classifiers)"
            )
        weights = {name: open_weights(path, f"expert {name!r}") for name, path in experts.items()}
    except (FileNotFoundError, TypeError, ValueError) as error:
        raise _NoMergekit(f"cannot read a checkpoint: {error}") from None
    def shape(w, t):
        return tuple(w[t].shape) if t in w else None

    differ = [t for t in base_weights if t not in keys and any(shape(w, t) != shape(base_weights, t) for w in weights.values())]
    if not differ:
        return base, experts, ""
    shapes = ", ".join(f"{name} {shape(w, differ[0])}" for name, w in {"base": base_weights, **weights}.items())
    note = (
        f"left out of the merge (weight 0, the base's values): {', '.join(differ)}, whose shapes differ between the "
        f"base and the experts ({differ[0]}: {shapes}); mergekit reads every tensor and may refuse them, so each "
        "task's own head is in merged/tasks/<task>/ (Hugging Face classifiers) and merged/heads/"
    )
    return base, experts, note


def _weights(keys: list[str], value_of, default: float) -> list[dict]:
    """mergekit per-tensor weights: the first filter that is a substring of a tensor's name applies
    (so the longest names come first), every other tensor gets ``default``."""
    filters = [{"filter": key, "value": round(float(value_of(key)), 6)} for key in sorted(keys, key=len, reverse=True)]
    return filters + [{"value": default}]


def mergekit_config(coefficients: Coefficients, problem: MergeProblem) -> tuple[dict | None, str]:
    """A mergekit ``task_arithmetic`` config reproducing a task/layer/group-wise merge and a note on
    what it leaves out, or None and why there is none."""
    layout = coefficients.layout
    try:
        if layout.granularity == "element":
            raise _NoMergekit("element-wise coefficients have no mergekit equivalent")
        if any(len(slots) > 1 for slots in layout.tensor_slots.values()):
            raise _NoMergekit("chunk-wise coefficients have no mergekit equivalent")
        base, experts, note = _checkpoints(problem, list(layout.keys))
    except _NoMergekit as reason:
        return None, str(reason)
    values = coefficients().detach().cpu()
    models = [
        {"model": experts[name], "parameters": {"weight": _weights(list(layout.keys), lambda key: values[k, layout.tensor_slots[key][0]], 0.0)}}
        for k, name in enumerate(layout.expert_names)
    ]
    config = {"merge_method": "task_arithmetic", "base_model": base, "models": models, "parameters": {"normalize": False}}
    return {**config, "dtype": "float32"}, note


DARE_NOTE = (
    "DARE drops entries at random: mergekit draws its own masks (same density; survivors rescaled to keep "
    "each tensor's L1 norm, ≈ 1/density), so its merge equals this one in distribution, not tensor by tensor"
)


def _mergekit_method(name: str, args: Mapping, experts: int) -> tuple[str, list[float], dict, dict, str]:
    """mergekit's method for a data-free one: (method, weight per expert, per-model parameters,
    global parameters, a note), from the method's arguments with its own defaults."""
    defaults = {p.name: p.default for p in inspect.signature(get_method(name)).parameters.values() if p.default is not p.empty}
    args = {**defaults, **args}
    if name == "average":
        return "linear", [1.0] * experts, {}, {"normalize": True}, ""
    if name == "task_arithmetic":
        scaling = args["scaling"]
        weights = [float(s) for s in scaling] if isinstance(scaling, (list, tuple)) else [float(scaling)] * experts
        return "task_arithmetic", weights, {}, {"normalize": False}, ""
    if name == "ties":
        if args["trim_scope"] != "tensor":
            raise _NoMergekit(
                f"ties with trim_scope {args['trim_scope']!r} (one threshold per expert over the whole model) has no mergekit "
                "equivalent: mergekit trims each tensor (method.args.trim_scope: tensor)"
            )
        if args["sign_method"] != "sum":
            raise _NoMergekit(f"mergekit's ties elects signs by total mass ('sum'), not {args['sign_method']!r}")
        return "ties", [1.0] * experts, {"density": args["density"]}, {"normalize": True, "lambda": args["scaling"]}, ""
    if name == "dare":
        note = DARE_NOTE
        if args["sign_election"]:
            parameters = {"normalize": True, "lambda": args["scaling"]}
            return "dare_ties", [1.0] * experts, {"density": args["density"]}, parameters, note
        return "dare_linear", [float(args["scaling"])] * experts, {"density": args["density"]}, {"normalize": False}, note
    raise _NoMergekit(f"`{name}` has no mergekit equivalent (mergekit.yaml is written for average, task_arithmetic, ties and dare)")


def method_mergekit_config(name: str, args: Mapping, problem: MergeProblem, scope: Mapping) -> tuple[dict | None, str]:
    """The mergekit config of a data-free merge (``adamerge merge``) and a note, or None and why there is none."""
    keys = [n for n, p in problem.pretrained.named_parameters() if p.is_floating_point() and in_scope(n, **scope)]
    try:
        method, weights, per_model, parameters, method_note = _mergekit_method(name, args, len(problem.experts))
        base, experts, note = _checkpoints(problem, keys)
    except _NoMergekit as reason:
        return None, str(reason)
    models = [
        {"model": path, "parameters": {"weight": _weights(keys, lambda _: w, 0.0), **per_model}}
        for w, path in zip(weights, experts.values())
    ]
    config = {"merge_method": method, "base_model": base}
    if method == "linear":  # no base model in a weighted average: it keeps the tensors outside the merge
        config = {"merge_method": method}
        models.append({"model": base, "parameters": {"weight": _weights(keys, lambda _: 0.0, 1.0)}})
    config.update(models=models, parameters=parameters, dtype="float32")
    if method == "ties":
        numels = {n: p.numel() for n, p in problem.pretrained.named_parameters() if n in set(keys)}
        method_note = _trim_note(float(per_model["density"]), numels)
    return config, "; ".join(n for n in (method_note, note) if n)


def _trim_note(density: float, numels: Mapping[str, int]) -> str:
    """Where mergekit's trim keeps ``int(density·n)`` entries (at least one) and adamerge's ``ceil(density·n)``."""
    differ = [k for k, n in numels.items() if max(1, int(density * n)) != keep_count(n, density)]
    if not differ:
        return ""
    return (f"density {density}: mergekit keeps int(density·n) entries of a tensor, adamerge ceil(density·n), so "
            f"{len(differ)} tensor(s) keep one entry fewer in mergekit and differ there (e.g. {differ[0]})")


def _write_mergekit(folder: Path, config: dict | None, note: str) -> None:
    """``mergekit.yaml`` where mergekit can run the merge, ``mergekit.txt`` saying why not or what to know."""
    if config is not None:
        write_text(folder / "mergekit.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))
    if note:
        write_text(folder / "mergekit.txt", note + "\n")


def write_mergekit(folder: Path, coefficients: Coefficients, problem: MergeProblem) -> None:
    _write_mergekit(folder, *mergekit_config(coefficients, problem))


def write_method_mergekit(folder: Path, recipe: DictConfig, problem: MergeProblem, scope: Mapping) -> None:
    _write_mergekit(folder, *method_mergekit_config(recipe.method.name, to_plain(recipe.method.args), problem, scope))


# ---------------------------------------------------------------------- in

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
        differ = _trim_note(density, {k: math.prod(s) for k, s in self.shapes.items()})
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
