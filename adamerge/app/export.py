"""Writing a run's results: coefficients, merged model, model card, mergekit config, metrics, plots.

Everything here writes into a folder the caller makes atomic (``checkpoints.atomic_directory``),
so a crash never leaves a run that looks finished.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from adamerge.io.checkpoints import open_weights, save_safetensors, write_text
from adamerge.app.config import save_recipe, to_plain
from adamerge.learning.evaluate import average_accuracy
from adamerge.core.coefficients import MergeCoefficients
from adamerge.core.element import ElementCoefficients
from adamerge.methods import get_method
from adamerge.app.plots import coefficient_heatmap
from adamerge.app.problems import MergeProblem
from adamerge.core.task_vectors import in_scope

Coefficients = MergeCoefficients | ElementCoefficients


def save_merged_model(module: nn.Module, problem: MergeProblem, folder: Path) -> None:
    """The merged model in the format its users open directly (HF directory or safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    if problem.save_model is not None:
        problem.save_model(module, folder)
    else:
        save_safetensors(module.state_dict(), folder / "model.safetensors")
    if problem.save_extras is not None:
        problem.save_extras(folder)


def save_streamed_model(shards: Path, problem: MergeProblem, folder: Path) -> None:
    """A streamed run's merged model: its shards moved (or, where names change, rewritten one at a
    time) into ``folder`` with the index and the config; it never exists whole in memory."""
    from safetensors import safe_open

    from adamerge.io.shards import ShardWriter

    files = sorted(shards.glob("model-*-of-*.safetensors"))
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            keys = list(handle.keys())
            if all(problem.exported_key(k) == k for k in keys):
                tensors = None
            else:
                tensors = {problem.exported_key(k): handle.get_tensor(k) for k in keys if problem.exported_key(k) is not None}
        if tensors is None:
            os.replace(file, folder / file.name)
        else:
            save_safetensors(tensors, folder / file.name, metadata={"format": "pt"})
    ShardWriter(folder, len(files)).finish()
    if problem.save_config is not None:
        problem.save_config(folder)
    if problem.save_extras is not None:
        problem.save_extras(folder)


def results_table(results: Mapping[str, Mapping[str, Mapping]]) -> str:
    """Markdown table of accuracy per task (columns) and method (rows), with the average."""
    tasks = list(dict.fromkeys(t for r in results.values() for t in r))
    lines = ["| method | " + " | ".join(tasks) + " | avg |", "|---" * (len(tasks) + 2) + "|"]
    for method, per_task in results.items():
        cells = [_percent(per_task.get(t, {}).get("accuracy")) for t in tasks]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {_percent(average_accuracy(per_task))} |")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def write_results(folder: Path, results: Mapping[str, Mapping]) -> None:
    """``eval.json`` (everything) and ``eval.csv`` (one row per task)."""
    write_text(folder / "eval.json", json.dumps(results, indent=1))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["task", "accuracy", "entropy", "mean_prediction_entropy", "histogram"])
    for task, r in results.items():
        writer.writerow([task, r.get("accuracy", ""), r["entropy"], r["mean_prediction_entropy"], r.get("histogram", "")])
    write_text(folder / "eval.csv", buffer.getvalue())


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TASK_TYPES = {"hf_sequence_classification": "text-classification", "hf_clip": "zero-shot-image-classification",
              "hf_causal_lm": "text-generation"}


def hub_id(source) -> str | None:
    """The Hugging Face hub id a model is known by: the name itself, or the ``_name_or_path`` its
    folder's config.json records; None for anything else, as a card's ``base_model`` is a hub link."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(source).expanduser()
    if not path.exists():
        return str(source) if HUB_ID.match(str(source)) else None
    if not (path / "config.json").is_file():
        return None
    name = json.loads((path / "config.json").read_text()).get("_name_or_path")
    return name if isinstance(name, str) and HUB_ID.match(name) and not Path(name).expanduser().exists() else None


def model_card(
    recipe: DictConfig,
    problem: MergeProblem,
    how: str,
    results: Mapping[str, Mapping] | None,
    coefficients: Coefficients | None = None,
) -> str:
    """A Hugging Face model card (``huggingface_hub``'s ModelCard): base model by hub id, experts,
    method, mean coefficient per expert and the evaluation, also as model-index results."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    description = problem.description
    kind = str(description.get("kind", ""))
    base = description.get("base", "unknown")
    experts = description.get("experts", {})
    evals = [
        EvalResult(task_type=TASK_TYPES.get(kind, "other"), dataset_type=task, dataset_name=task,
                   metric_type="accuracy", metric_value=r["accuracy"])
        for task, r in (results or {}).items() if "accuracy" in r
    ]
    data = ModelCardData(
        model_name=recipe.name,
        base_model=hub_id(base),
        tags=["merge", "adamerge", "model-merging"],
        library_name="transformers" if kind.startswith("hf_") else "pytorch",
        eval_results=evals or None,
    )
    lines = [f"# {recipe.name}", "", f"Merged with adamerge: {how}.", "", f"- **Base model:** `{hub_id(base) or base}`"]
    lines += ["- **Experts:**"] + [f"  - `{name}`: `{hub_id(path) or path}`" for name, path in experts.items()]
    if coefficients is not None:
        means = coefficients.summary().mean(dim=1).tolist()
        lines += ["", "## Coefficients", "", "Mean coefficient per expert (over its coefficient slots):", ""]
        lines += ["| expert | mean |", "|---|---|"] + [
            f"| {name} | {mean:.4f} |" for name, mean in zip(coefficients.layout.expert_names, means)
        ]
    if results:
        lines += ["", "## Evaluation", "", results_table({recipe.name: results})]
    lines += ["", "## Reproduce", "", "```bash", f"adamerge {'merge' if recipe.method else 'fit'} recipe.yaml", "```", ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


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
        note = (
            "DARE drops entries at random: mergekit draws its own masks (same density, survivors rescaled by "
            "1/density), so its merge equals this one in distribution, not tensor by tensor"
        )
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
    return config, "; ".join(n for n in (method_note, note) if n)


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


def write_common(
    folder: Path,
    recipe: DictConfig,
    problem: MergeProblem,
    module: nn.Module | Path,
    how: str,
    results: Mapping[str, Mapping] | None,
    coefficients: Coefficients | None = None,
) -> None:
    """Recipe, evaluation and merged model with its card: what every run directory holds.
    ``module``: the merged model, or the folder of a streamed run's shards."""
    save_recipe(recipe, folder / "recipe.yaml")
    if results:
        write_results(folder, results)
    if recipe.export.merged_model:
        target = folder / "merged"
        if isinstance(module, Path):
            save_streamed_model(module, problem, target)
        else:
            save_merged_model(module, problem, target)
        write_text(target / "README.md", model_card(recipe, problem, how, results, coefficients))


def write_coefficients(folder: Path, coefficients: Coefficients, recipe: DictConfig, problem: MergeProblem) -> None:
    coefficients.save(folder / "coefficients.safetensors", {"recipe": OmegaConf.to_yaml(recipe)})
    if recipe.export.plot:
        coefficient_heatmap(coefficients, folder / "coefficients.png", title=recipe.name)
    if recipe.export.mergekit:
        write_mergekit(folder, coefficients, problem)
