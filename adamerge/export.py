"""Writing a run's results: coefficients, merged model, model card, mergekit config, metrics, plots.

Everything here writes into a folder the caller makes atomic (``checkpoints.atomic_directory``),
so a crash never leaves a run that looks finished.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from adamerge.checkpoints import open_weights, save_safetensors, write_text
from adamerge.config import save_recipe
from adamerge.evaluate import average_accuracy
from adamerge.coefficients import MergeCoefficients
from adamerge.element import ElementCoefficients
from adamerge.plotting import coefficient_heatmap
from adamerge.problems import MergeProblem

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


def mergekit_config(coefficients: Coefficients, problem: MergeProblem) -> tuple[dict | None, str]:
    """A mergekit ``task_arithmetic`` config reproducing a task/layer/group-wise merge, or why there is none."""
    layout = coefficients.layout
    if layout.granularity == "element":
        return None, "element-wise coefficients have no mergekit equivalent"
    if any(len(slots) > 1 for slots in layout.tensor_slots.values()):
        return None, "chunk-wise coefficients have no mergekit equivalent"
    base = problem.description.get("base")
    experts = problem.description.get("experts", {})
    if not isinstance(base, str) or not all(isinstance(p, str) for p in experts.values()):
        return None, "the base model and experts are not all checkpoints on disk"
    try:
        base_names = set(open_weights(base))
    except (FileNotFoundError, TypeError, ValueError) as error:
        return None, f"cannot read the base checkpoint: {error}"
    if not set(layout.keys) <= base_names:
        return None, "the merged tensors are named differently in the base checkpoint (e.g. an encoder inside a classifier)"
    values = coefficients().detach().cpu()
    models = []
    for k, name in enumerate(layout.expert_names):
        filters = [
            {"filter": key, "value": round(float(values[k, layout.tensor_slots[key][0]]), 6)}
            for key in sorted(layout.keys, key=len, reverse=True)
        ]
        models.append({"model": experts[name], "parameters": {"weight": filters + [{"value": 0.0}]}})
    config = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": models,
        "parameters": {"normalize": False},
        "dtype": "float32",
    }
    return config, "ok"


def write_mergekit(folder: Path, coefficients: Coefficients, problem: MergeProblem) -> str:
    config, reason = mergekit_config(coefficients, problem)
    if config is not None:
        write_text(folder / "mergekit.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))
    return reason


def write_common(
    folder: Path,
    recipe: DictConfig,
    problem: MergeProblem,
    module: nn.Module,
    how: str,
    results: Mapping[str, Mapping] | None,
    coefficients: Coefficients | None = None,
) -> None:
    """Recipe, evaluation and merged model with its card: what every run directory holds."""
    save_recipe(recipe, folder / "recipe.yaml")
    if results:
        write_results(folder, results)
    if recipe.export.merged_model:
        target = folder / "merged"
        save_merged_model(module, problem, target)
        write_text(target / "README.md", model_card(recipe, problem, how, results, coefficients))


def write_coefficients(folder: Path, coefficients: Coefficients, recipe: DictConfig, problem: MergeProblem) -> None:
    coefficients.save(folder / "coefficients.safetensors", {"recipe": OmegaConf.to_yaml(recipe)})
    if recipe.export.plot:
        coefficient_heatmap(coefficients, folder / "coefficients.png", title=recipe.name)
    if recipe.export.mergekit:
        write_mergekit(folder, coefficients, problem)
