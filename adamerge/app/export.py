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

from adamerge.io.checkpoints import write_text
from adamerge.app.config import save_recipe, shard_size_bytes
from adamerge.learning.evaluation import average_accuracy
from adamerge.app.mergekit.write import Coefficients, task_vector_processing, write_mergekit
from adamerge.app.plots import coefficient_heatmap
from adamerge.app.problems.problem import MergeProblem


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
# what merged/ itself is, for the hub's pipeline_tag and the card's "Use" line (a sequence classifier's is its bare encoder)
PIPELINE_TAGS = {"hf_sequence_classification": "feature-extraction", "hf_clip": "zero-shot-image-classification",
                 "hf_causal_lm": "text-generation"}
USAGE = {
    "hf_sequence_classification": "`AutoModel.from_pretrained(\"merged\")` (the merged encoder); each task's classifier, where written: "
                                  "`AutoModelForSequenceClassification.from_pretrained(\"merged/tasks/<task>\")`",
    "hf_clip": "`CLIPModel.from_pretrained(\"merged\")`, or `pipeline(\"zero-shot-image-classification\", model=\"merged\")`",
    "hf_causal_lm": "`AutoModelForCausalLM.from_pretrained(\"merged\")`",
}
HF_USAGE = "`AutoModel.from_pretrained(\"merged\")`"
PLAIN_USAGE = ("`huggingface_hub.load_torch_model(model, \"merged\", strict=False)` into the architecture "
               "(tied parameters are stored once; the file metadata names each alias)")


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
    hf = kind.startswith("hf_")
    data = ModelCardData(
        model_name=recipe.name,
        base_model=hub_id(base),
        tags=["merge", "adamerge", "model-merging", "safetensors"] + ([] if hf else ["pytorch"]),
        library_name="transformers" if hf else None,  # the hub knows no library for a plain nn.Module
        pipeline_tag=PIPELINE_TAGS.get(kind),
        eval_results=evals or None,
    )
    lines = [f"# {recipe.name}", "", f"Merged with adamerge: {how}."]
    lines += ["", f"Open it with {USAGE.get(kind, HF_USAGE if hf else PLAIN_USAGE)}."]
    lines += ["", description["note"] + "."] if "note" in description else []
    lines += ["", f"- **Base model:** `{hub_id(base) or base}`"]
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
            problem.exporter.export_streamed(module, target)
        else:
            problem.exporter.export(module, target, shard_size_bytes(recipe.export.max_shard_size))
        write_text(target / "README.md", model_card(recipe, problem, how, results, coefficients))


def write_coefficients(folder: Path, coefficients: Coefficients, recipe: DictConfig, problem: MergeProblem) -> None:
    coefficients.save(folder / "coefficients.safetensors", {"recipe": OmegaConf.to_yaml(recipe)})
    if recipe.export.plot:
        coefficient_heatmap(coefficients, folder / "coefficients.png", title=recipe.name)
    if recipe.export.mergekit:
        write_mergekit(folder, coefficients, problem, task_vector_processing(recipe.task_vectors))
