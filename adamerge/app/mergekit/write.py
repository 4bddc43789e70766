"""mergekit out: a run's ``mergekit.yaml`` reproducing its merge where mergekit can (task/layer/group-wise
learned coefficients, and the data-free methods of :mod:`.methods`' table), ``mergekit.txt`` saying
why not or what differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from adamerge.app.config import to_plain
from adamerge.app.mergekit.methods import NoMergekit, to_mergekit
from adamerge.app.problems.problem import MergeProblem
from adamerge.core.coefficients import MergeCoefficients
from adamerge.core.element import ElementCoefficients
from adamerge.core.scope import in_scope
from adamerge.io.checkpoints import open_weights, write_text

Coefficients = MergeCoefficients | ElementCoefficients


def _checkpoints(problem: MergeProblem, keys: list[str]) -> tuple[str, dict[str, str], str]:
    """The base and expert checkpoints mergekit reads, and a note on tensors outside the merge whose
    shapes differ between them (task heads), which mergekit cannot merge."""
    base = problem.description.get("base")
    experts = problem.description.get("experts", {})
    if not isinstance(base, str) or not all(isinstance(p, str) for p in experts.values()):
        raise NoMergekit("the base model and experts are not all checkpoints on disk")
    try:
        base_weights = open_weights(base, "pretrained")
        if not set(keys) <= set(base_weights):
            raise NoMergekit(
                "the merged tensors are named differently in the base checkpoint (e.g. a bare encoder as the base of classifiers)"
            )
        weights = {name: open_weights(path, f"expert {name!r}") for name, path in experts.items()}
    except (FileNotFoundError, TypeError, ValueError) as error:
        raise NoMergekit(f"cannot read a checkpoint: {error}") from None
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
            raise NoMergekit(
                f"the coefficients weight task vectors processed by {processed}; mergekit's task_arithmetic would weight the raw ones"
            )
        if layout.granularity == "element":
            raise NoMergekit("element-wise coefficients have no mergekit equivalent")
        if any(len(slots) > 1 for slots in layout.tensor_slots.values()):
            raise NoMergekit(f"{layout.granularity}-wise coefficients have no mergekit equivalent")
        base, experts, note = _checkpoints(problem, list(layout.keys))
    except NoMergekit as reason:
        return None, str(reason)
    values = coefficients().detach().cpu()
    models = [
        {"model": experts[name], "parameters": {"weight": _weights(list(layout.keys), lambda key: values[k, layout.tensor_slots[key][0]], 0.0)}}
        for k, name in enumerate(layout.expert_names)
    ]
    config = {"merge_method": "task_arithmetic", "base_model": base, "models": models, "parameters": {"normalize": False}}
    return {**config, "dtype": "float32"}, note


def method_mergekit_config(name: str, args: Mapping, problem: MergeProblem, scope: Mapping) -> tuple[dict | None, str]:
    """The mergekit config of a data-free merge (``adamerge merge``) and a note, or None and why there is none."""
    numels = {n: p.numel() for n, p in problem.pretrained.named_parameters() if p.is_floating_point() and in_scope(n, **scope)}
    keys = list(numels)
    try:
        method = to_mergekit(name, args, len(problem.experts), numels)
        base, experts, note = _checkpoints(problem, keys)
    except NoMergekit as reason:
        return None, str(reason)
    models = [
        {"model": path, "parameters": {"weight": _weights(keys, lambda _: w, 0.0), **method.per_model}}
        for w, path in zip(method.weights, experts.values())
    ]
    config = {"merge_method": method.method, "base_model": base}
    if method.method == "linear":  # no base model in a weighted average: it keeps the tensors outside the merge
        config = {"merge_method": method.method}
        models.append({"model": base, "parameters": {"weight": _weights(keys, lambda _: 0.0, 1.0)}})
    config.update(models=models, parameters=method.parameters, dtype="float32")
    return config, "; ".join(n for n in (method.note, note) if n)


def _write_mergekit(folder: Path, config: dict | None, note: str) -> None:
    """``mergekit.yaml`` where mergekit can run the merge, ``mergekit.txt`` saying why not or what to know."""
    if config is not None:
        write_text(folder / "mergekit.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))
    if note:
        write_text(folder / "mergekit.txt", note + "\n")


def write_mergekit(folder: Path, coefficients: Coefficients, problem: MergeProblem, processed: str | None = None) -> None:
    """A learned run's ``mergekit.yaml`` / ``mergekit.txt`` into ``folder``."""
    _write_mergekit(folder, *mergekit_config(coefficients, problem, processed))


def write_method_mergekit(folder: Path, recipe: DictConfig, problem: MergeProblem, scope: Mapping) -> None:
    """A data-free run's ``mergekit.yaml`` / ``mergekit.txt`` into ``folder``."""
    _write_mergekit(folder, *method_mergekit_config(recipe.method.name, to_plain(recipe.method.args), problem, scope))
