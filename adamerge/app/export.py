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

from adamerge.io.checkpoints import save_safetensors, write_text
from adamerge.app.config import save_recipe, shard_size_bytes
from adamerge.core.scope import parameter_aliases
from adamerge.learning.evaluation import average_accuracy
from adamerge.app.mergekit.write import Coefficients, task_vector_processing, write_mergekit
from adamerge.app.plots import coefficient_heatmap
from adamerge.app.problem import MergeProblem


def save_merged_model(module: nn.Module, problem: MergeProblem, folder: Path, max_shard_size: str = "5GB") -> None:
    """The merged model in the format its users open directly: the problem's own (a Hugging Face
    folder), else the module's weights as safetensors shards (:func:`save_state_dict`); both split
    into shards of at most ``max_shard_size`` with an index, as Hugging Face does."""
    folder.mkdir(parents=True, exist_ok=True)
    if problem.save_model is not None:
        problem.save_model(module, folder, shard_size_bytes(max_shard_size))
    else:
        save_state_dict(module, folder, shard_size_bytes(max_shard_size))
    if problem.save_extras is not None:
        problem.save_extras(folder)


def save_state_dict(module: nn.Module, folder: Path, max_shard_size: int) -> None:
    """A plain module's weights laid out as Hugging Face lays out a checkpoint, by huggingface_hub's
    shard splitter: ``model.safetensors`` when they fit one shard, else ``model-0000i-of-0000n.safetensors``
    and ``model.safetensors.index.json``. safetensors stores shared storage once: a tied parameter is kept
    under its first name in ``named_parameters`` and each alias is recorded as ``alias: name`` in the
    metadata; loading into the module (``huggingface_hub.load_torch_model(model, folder, strict=False)``)
    fills the alias through the tie."""
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(module.state_dict(), folder, max_shard_size=max_shard_size,
                          shared_tensors_to_discard=list(parameter_aliases(module)))


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
            save_streamed_model(module, problem, target)
        else:
            save_merged_model(module, problem, target, recipe.export.max_shard_size)
        write_text(target / "README.md", model_card(recipe, problem, how, results, coefficients))


def write_coefficients(folder: Path, coefficients: Coefficients, recipe: DictConfig, problem: MergeProblem) -> None:
    coefficients.save(folder / "coefficients.safetensors", {"recipe": OmegaConf.to_yaml(recipe)})
    if recipe.export.plot:
        coefficient_heatmap(coefficients, folder / "coefficients.png", title=recipe.name)
    if recipe.export.mergekit:
        write_mergekit(folder, coefficients, problem, task_vector_processing(recipe.task_vectors))
