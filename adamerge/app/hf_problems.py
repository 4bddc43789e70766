"""The Hugging Face problem kinds: sequence classifiers sharing an encoder (``hf_sequence_classification``),
CLIP zero-shot (``hf_clip``) and causal LMs (``hf_causal_lm``); the streamed ones also build a
skeleton on ``meta`` and read the checkpoint lazily."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from adamerge.app.config import ProblemConfig, TaskConfig
from adamerge.app.problem import Exporter, MergeProblem, experts_of, has_data, load_table, require
from adamerge.app.rundir import inside
from adamerge.io.checkpoints import open_weights
from adamerge.io.lora import is_adapter, open_adapter


def _save_hf(tokenizer_or_processor) -> Exporter:
    from adamerge.tasks.hf import quiet_transformers

    def save(module: nn.Module, folder: Path, max_shard_size: int) -> None:
        with quiet_transformers():
            module.save_pretrained(folder, max_shard_size=max_shard_size)
        if tokenizer_or_processor is not None:
            tokenizer_or_processor.save_pretrained(folder)

    return save


def _label_ids(task: TaskConfig, expert) -> dict[str, int]:
    """Class name -> id for string labels: the task's ``label_names`` in order, else its expert's ``label2id``."""
    if task.label_names:
        return {name: i for i, name in enumerate(task.label_names)}
    config_file = Path(str(expert)) / "config.json"
    if config_file.is_file():
        return {str(k): int(v) for k, v in (json.loads(config_file.read_text()).get("label2id") or {}).items()}
    return {}


def sequence_classification_problem(config: ProblemConfig, streamed: bool = False) -> MergeProblem:
    """K sequence classifiers fine-tuned from one encoder; each task keeps its expert's head."""
    from transformers import AutoTokenizer

    from adamerge.tasks import hf

    require(config, "pretrained", "tasks", "experts")
    backbone = hf.load_sequence_classifier(config.pretrained, empty=streamed)
    tokenizer = AutoTokenizer.from_pretrained(config.pretrained)
    experts = experts_of(config)
    heads = {n: _classifier_of(backbone, n, config.tasks[n].expert) for n in config.tasks}
    tasks, scope = hf.sequence_classification_tasks(backbone, heads)
    calibration, evaluation = {}, {}
    for name, task in config.tasks.items():
        label_ids = _label_ids(task, experts[name])
        if has_data(task.calibration):
            calibration[name] = hf.tokenize_text(
                load_table(task.calibration, name, config.seed), tokenizer, task.text, task.text_pair, task.label,
                config.max_length, name, label_ids, labels_needed=False,
            )
        if task.evaluation is not None:
            evaluation[name] = hf.tokenize_text(
                load_table(task.evaluation, name, config.seed), tokenizer, task.text, task.text_pair, task.label,
                config.max_length, name, label_ids,
            )
    encoder_prefix = backbone.base_model_prefix

    def save_model(module: nn.Module, folder: Path, max_shard_size: int) -> None:
        with hf.quiet_transformers():
            getattr(module, encoder_prefix).save_pretrained(folder, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(folder)
        encoder = {k: v for k, v in module.state_dict().items() if k.startswith(encoder_prefix + ".")}
        for name, task in tasks.items():
            target = inside(folder, folder / "tasks" / name)
            if not (Path(experts[name]) / "config.json").is_file():
                warnings.warn(f"task {name!r}: expert {experts[name]} has no config.json, so no {target} (its head is in heads/)")
                continue
            hf.save_task_classifier(encoder, task.head.as_dict(), experts[name], tokenizer, target, max_shard_size)

    def save_heads(folder: Path) -> None:
        from adamerge.io.checkpoints import save_safetensors

        for name, task in tasks.items():
            save_safetensors(task.head.as_dict(), inside(folder, folder / "heads" / f"{name}.safetensors"))

    return MergeProblem(
        pretrained=backbone,
        experts=experts,
        tasks=tasks,
        calibration=calibration,
        evaluation=evaluation,
        collate=hf.text_collate(tokenizer),
        include=[scope],
        save_model=save_model,
        save_extras=save_heads,
        description={"kind": config.kind, "base": config.pretrained, "experts": {k: str(v) for k, v in experts.items()}},
        **(_streamed_encoder(backbone, config.pretrained, tokenizer) if streamed else {}),
    )


def _classifier_of(backbone: nn.Module, name: str, expert):
    """Where task ``name``'s head is read: its expert, or for a PEFT LoRA adapter (whose encoder's τ is
    ΔW) the adapter over the pretrained weights, whose head is the classifier PEFT saved whole
    (``modules_to_save``, as ``task_type='SEQ_CLS'`` sets); the backbone's placeholder head is no head."""
    from adamerge.tasks.hf import head_keys

    if not is_adapter(expert):
        return expert
    opened = open_adapter(expert, open_weights(backbone), f"expert {name!r}")
    missing = [key for key in head_keys(backbone, opened) if key not in opened.adapter.full]
    if missing:
        raise KeyError(
            f"expert {name!r} {opened.adapter.file}: the adapter saves no classifier head {missing[0]!r} "
            "(train it with task_type='SEQ_CLS' or modules_to_save=[<the head>])"
        )
    return opened


def _streamed_encoder(backbone: nn.Module, pretrained: str, tokenizer) -> dict[str, Any]:
    """A streamed sequence classifier writes its merged encoder (the heads go to ``heads/``)."""
    prefix = backbone.base_model_prefix + "."

    def save_config(folder: Path) -> None:
        getattr(backbone, backbone.base_model_prefix).config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return {
        "pretrained_weights": open_weights(pretrained, "pretrained"),
        "save_config": save_config,
        "exported_key": lambda key: key[len(prefix):] if key.startswith(prefix) else None,
    }


def clip_problem(config: ProblemConfig) -> MergeProblem:
    """CLIP vision towers fine-tuned per task, merged; zero-shot heads from the pretrained text tower."""
    from transformers import AutoProcessor

    from adamerge.tasks import hf

    require(config, "pretrained", "tasks", "experts")
    vision, full = hf.load_clip(config.pretrained)
    processor = AutoProcessor.from_pretrained(config.pretrained)
    tokenizer = getattr(processor, "tokenizer", processor)
    image_processor = getattr(processor, "image_processor", processor)
    tasks, calibration, evaluation = {}, {}, {}
    for name, task in config.tasks.items():
        if not task.classnames:
            raise ValueError(f"task {name!r}: CLIP tasks need 'classnames'")
        embeddings = hf.clip_class_embeddings(full, tokenizer, task.classnames, task.templates or hf.DEFAULT_TEMPLATES)
        tasks[name] = hf.CLIPZeroShotTask(name, embeddings, full.logit_scale.exp().item())
        if has_data(task.calibration):
            calibration[name] = _images(load_table(task.calibration, name, config.seed), task, with_label=True)
        if task.evaluation is not None:
            evaluation[name] = _images(load_table(task.evaluation, name, config.seed), task, with_label=True)
    return MergeProblem(
        pretrained=vision,
        experts=experts_of(config),
        tasks=tasks,
        calibration=calibration,
        evaluation=evaluation,
        collate=hf.image_collate(image_processor),
        include=[r"^(vision_model|visual_projection)\."],
        save_model=_save_clip(config.pretrained, processor),
        description={"kind": config.kind, "base": config.pretrained, "experts": experts_of(config),
                     "note": "the vision tower and its projection are merged; the text tower, logit scale and "
                             "processor are the pretrained model's, as in the zero-shot evaluation"},
    )


def _save_clip(pretrained: str, processor) -> Exporter:
    """A complete ``CLIPModel``: the merged vision tower and projection over the pretrained text tower
    and logit scale, with the processor, so ``CLIPModel.from_pretrained`` and the zero-shot pipeline
    open the model the evaluation scored (the zero-shot heads are the pretrained text embeddings)."""
    from transformers import CLIPModel

    from adamerge.tasks.hf import quiet_transformers

    def save(module: nn.Module, folder: Path, max_shard_size: int) -> None:
        with quiet_transformers():
            full = CLIPModel.from_pretrained(pretrained)
        loaded = full.load_state_dict(module.state_dict(), strict=False)
        if loaded.unexpected_keys:
            raise KeyError(f"hf_clip: merged tensor {loaded.unexpected_keys[0]!r} is not in the CLIPModel of {pretrained}")
        unmerged = [key for key in loaded.missing_keys if key.startswith(("vision_model.", "visual_projection."))]
        if unmerged:
            raise KeyError(f"hf_clip: vision tensor {unmerged[0]!r} of {pretrained} is missing from the merged model")
        with quiet_transformers():
            full.save_pretrained(folder, max_shard_size=max_shard_size)
        processor.save_pretrained(folder)

    return save


def _images(table, task, with_label: bool = True):
    if task.image not in table.column_names:
        raise KeyError(f"column {task.image!r} not in the data (columns: {table.column_names})")
    keep = [task.image] + ([task.label] if with_label and task.label in table.column_names else [])
    table = table.select_columns(keep)
    if task.image != "image":
        table = table.rename_column(task.image, "image")
    if with_label and task.label and task.label != "label" and task.label in keep:
        table = table.rename_column(task.label, "label")
    return table


def causal_lm_problem(config: ProblemConfig, streamed: bool = False) -> MergeProblem:
    """Causal LMs merged whole; each task's logits are next-token predictions on its responses."""
    from transformers import AutoTokenizer

    from adamerge.tasks import hf

    require(config, "pretrained", "tasks")
    experts = experts_of(config)
    if not experts:
        raise ValueError("problem kind 'hf_causal_lm' needs experts (problem.tasks.<name>.expert or problem.experts)")
    backbone = hf.load_causal_lm(config.pretrained, empty=streamed)
    tokenizer = AutoTokenizer.from_pretrained(config.pretrained)
    tasks, calibration, evaluation = {}, {}, {}
    for name, task in config.tasks.items():
        tasks[name] = hf.CausalLMTask(name)
        if has_data(task.calibration):
            calibration[name] = hf.tokenize_prompts(
                load_table(task.calibration, name, config.seed), tokenizer, task.text, task.response, config.max_length, name
            )
        if task.evaluation is not None:
            evaluation[name] = hf.tokenize_prompts(
                load_table(task.evaluation, name, config.seed), tokenizer, task.text, task.response, config.max_length, name
            )
    return MergeProblem(
        pretrained=backbone,
        experts=experts,
        tasks=tasks,
        calibration=calibration,
        evaluation=evaluation,
        collate=hf.lm_collate(tokenizer),
        save_model=_save_hf(tokenizer),
        description={"kind": config.kind, "base": config.pretrained, "experts": experts},
        **(_streamed_whole(backbone, config.pretrained, tokenizer) if streamed else {}),
    )


def _streamed_whole(backbone: nn.Module, pretrained: str, tokenizer) -> dict[str, Any]:
    """A streamed model merged whole writes every tensor under its own name, with its config."""

    def save_config(folder: Path) -> None:
        backbone.config.save_pretrained(folder)
        if getattr(backbone, "generation_config", None) is not None:
            backbone.generation_config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return {"pretrained_weights": open_weights(pretrained, "pretrained"), "save_config": save_config}
