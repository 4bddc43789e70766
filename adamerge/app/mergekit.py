"""mergekit out (arcee-ai/mergekit, its YAML schema as of 0.1.5): ``mergekit.yaml`` reproducing a
run's merge where mergekit can (task/layer/group-wise learned coefficients, and the data-free
methods both tools have), ``mergekit.txt`` saying why not or what differs. Reading a mergekit
YAML is :mod:`adamerge.app.from_mergekit`.
"""


from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from adamerge.app.config import to_plain
from adamerge.app.problem import MergeProblem
from adamerge.core.coefficients import MergeCoefficients
from adamerge.core.element import ElementCoefficients
from adamerge.core.scope import in_scope
from adamerge.core.tensor_ops import keep_count
from adamerge.io.checkpoints import open_weights, write_text
from adamerge.methods import METHODS

Coefficients = MergeCoefficients | ElementCoefficients


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


def task_vector_processing(vectors: DictConfig) -> str | None:
    """The transforms a recipe's ``task_vectors`` section applies before learning ("TIES",
    "TSV-M", "wudi-start", ...), joined by "/", or None for plain task vectors."""
    steps = [label for name, label in (("ties", "TIES"), ("dare", "DARE"), ("tsv", "TSV-M")) if vectors[name] is not None]
    if vectors.start is not None:
        steps.append(f"{vectors.start.method}-start")
    return "/".join(steps) or None


def mergekit_config(coefficients: Coefficients, problem: MergeProblem, processed: str | None = None) -> tuple[dict | None, str]:
    """A mergekit ``task_arithmetic`` config reproducing a task/layer/group-wise merge and a note on
    what it leaves out, or None and why there is none (``processed``: the transform the task
    vectors went through, which weights on the experts' raw deltas would not reproduce)."""
    layout = coefficients.layout
    try:
        if processed:
            raise _NoMergekit(
                f"the coefficients weight task vectors processed by {processed}; mergekit's task_arithmetic would weight the raw ones"
            )
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
    defaults = {p.name: p.default for p in inspect.signature(METHODS.get(name)).parameters.values() if p.default is not p.empty}
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
        method_note = trim_note(float(per_model["density"]), numels)
    return config, "; ".join(n for n in (method_note, note) if n)


def trim_note(density: float, numels: Mapping[str, int]) -> str:
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


def write_mergekit(folder: Path, coefficients: Coefficients, problem: MergeProblem, processed: str | None = None) -> None:
    _write_mergekit(folder, *mergekit_config(coefficients, problem, processed))


def write_method_mergekit(folder: Path, recipe: DictConfig, problem: MergeProblem, scope: Mapping) -> None:
    _write_mergekit(folder, *method_mergekit_config(recipe.method.name, to_plain(recipe.method.args), problem, scope))


