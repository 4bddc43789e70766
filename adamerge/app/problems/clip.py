"""The ``hf_clip`` kind: CLIP vision towers fine-tuned per task, merged; each task's zero-shot head
comes from its class names through the pretrained text tower. Its export is a complete
``CLIPModel`` (the merged vision tower and projection over the pretrained text tower and logit
scale) with the processor, so ``CLIPModel.from_pretrained`` and the zero-shot pipeline open the
model the evaluation scored."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from adamerge.app.config import ProblemConfig, TaskConfig
from adamerge.app.problems.data import load_task_data
from adamerge.app.problems.problem import Exporter, MergeProblem, experts_of, load_pretrained, require


def clip_problem(config: ProblemConfig) -> MergeProblem:
    from transformers import AutoProcessor

    from adamerge.tasks import hf

    require(config, "pretrained", "tasks", "experts")
    vision, full = load_pretrained(config.pretrained, lambda path: hf.load_clip(path, config.dtype))
    processor = load_pretrained(config.pretrained, AutoProcessor.from_pretrained)
    tokenizer = getattr(processor, "tokenizer", processor)
    image_processor = getattr(processor, "image_processor", processor)
    tasks = {}
    for name, task in config.tasks.items():
        if not task.classnames:
            raise ValueError(f"task {name!r}: CLIP tasks need 'classnames'")
        embeddings = hf.clip_class_embeddings(full, tokenizer, task.classnames, task.templates or hf.DEFAULT_TEMPLATES)
        tasks[name] = hf.CLIPZeroShotTask(name, embeddings, full.logit_scale.exp().item())
    calibration, evaluation, validation = load_task_data(config, _images)
    return MergeProblem(
        pretrained=vision,
        experts=experts_of(config),
        tasks=tasks,
        calibration=calibration,
        evaluation=evaluation,
        validation=validation,
        collate=hf.image_collate(image_processor),
        include=[r"^(vision_model|visual_projection)\."],
        exporter=ClipExporter(config.pretrained, processor),
        description={"kind": config.kind, "base": config.pretrained, "experts": experts_of(config),
                     "note": "the vision tower and its projection are merged; the text tower, logit scale and "
                             "processor are the pretrained model's, as in the zero-shot evaluation"},
    )


class ClipExporter(Exporter):
    """The merged vision tower and projection inside the pretrained ``CLIPModel``, and the processor."""

    def __init__(self, pretrained: str, processor):
        self.pretrained, self.processor = pretrained, processor

    def write_model(self, module: nn.Module, folder: Path, max_shard_size: int) -> None:
        from transformers import CLIPModel

        from adamerge.tasks.hf import quiet_transformers

        with quiet_transformers():
            full = CLIPModel.from_pretrained(self.pretrained)
        loaded = full.load_state_dict(module.state_dict(), strict=False)
        if loaded.unexpected_keys:
            raise KeyError(f"hf_clip: merged tensor {loaded.unexpected_keys[0]!r} is not in the CLIPModel of {self.pretrained}")
        unmerged = [key for key in loaded.missing_keys if key.startswith(("vision_model.", "visual_projection."))]
        if unmerged:
            raise KeyError(f"hf_clip: vision tensor {unmerged[0]!r} of {self.pretrained} is missing from the merged model")
        with quiet_transformers():
            full.save_pretrained(folder, max_shard_size=max_shard_size)

    def write_preprocessor(self, folder: Path) -> None:
        self.processor.save_pretrained(folder)


def _images(table, name: str, task: TaskConfig, labelled: bool):
    """The task's image column as ``image`` and, where the rows have it, its label column as ``label``."""
    if task.image not in table.column_names:
        raise KeyError(f"task {name!r}: column {task.image!r} not in the data (columns: {table.column_names})")
    keep = [task.image] + ([task.label] if task.label in table.column_names else [])
    table = table.select_columns(keep)
    if task.image != "image":
        table = table.rename_column(task.image, "image")
    if task.label and task.label != "label" and task.label in keep:
        table = table.rename_column(task.label, "label")
    return table
