"""The ``hf_sequence_classification`` kind: K sequence classifiers fine-tuned from one encoder
(or PEFT LoRA adapters over it); the encoder is merged and each task keeps its expert's head.
Its export is the merged encoder as a Hugging Face folder with the tokenizer, beside it each
task's complete classifier (``tasks/<task>/``) and head (``heads/<task>.safetensors``)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from torch import nn

from adamerge.app.config import ProblemConfig, TaskConfig
from adamerge.app.problems.data import load_task_data
from adamerge.app.problems.problem import Exporter, MergeProblem, experts_of, load_pretrained, require
from adamerge.app.rundir import inside
from adamerge.io.checkpoints import open_weights, save_safetensors
from adamerge.io.lora import is_adapter, open_adapter


def sequence_classification_problem(config: ProblemConfig, streamed: bool = False) -> MergeProblem:
    """``streamed``: the backbone's structure on ``meta`` and its checkpoint read lazily."""
    from transformers import AutoTokenizer

    from adamerge.tasks import hf

    require(config, "pretrained", "tasks", "experts")
    backbone = load_pretrained(config.pretrained, lambda path: hf.load_sequence_classifier(path, empty=streamed, dtype=config.dtype))
    tokenizer = load_pretrained(config.pretrained, AutoTokenizer.from_pretrained)
    experts = experts_of(config)
    heads = {n: _classifier_of(backbone, n, config.tasks[n].expert) for n in config.tasks}
    tasks, scope = hf.sequence_classification_tasks(backbone, heads)

    def prepare(table, name: str, task: TaskConfig, labelled: bool):
        return hf.tokenize_text(table, tokenizer, task.text, task.text_pair, task.label, config.max_length, name,
                                _label_ids(task, experts[name]), labels_needed=labelled)

    calibration, evaluation, validation = load_task_data(config, prepare)
    return MergeProblem(
        pretrained=backbone,
        experts=experts,
        tasks=tasks,
        calibration=calibration,
        evaluation=evaluation,
        validation=validation,
        collate=hf.text_collate(tokenizer),
        include=[scope],
        exporter=SequenceClassificationExporter(backbone, tokenizer, tasks, experts),
        description={"kind": config.kind, "base": config.pretrained, "experts": {k: str(v) for k, v in experts.items()}},
        pretrained_weights=open_weights(config.pretrained, "pretrained") if streamed else None,
    )


class SequenceClassificationExporter(Exporter):
    """The merged encoder (``AutoModel`` opens it), its tokenizer, each task's classifier (the
    merged encoder with its expert's head, config and labels) and each task's bare head."""

    def __init__(self, backbone: nn.Module, tokenizer, tasks: dict, experts: dict):
        self.prefix = backbone.base_model_prefix
        self.encoder_config = getattr(backbone, self.prefix).config
        self.tokenizer, self.tasks, self.experts = tokenizer, tasks, experts

    def write_model(self, module: nn.Module, folder: Path, max_shard_size: int) -> None:
        from adamerge.tasks.hf import quiet_transformers

        with quiet_transformers():
            getattr(module, self.prefix).save_pretrained(folder, max_shard_size=max_shard_size)

    def write_preprocessor(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder)

    def write_task_classifiers(self, module: nn.Module, folder: Path, max_shard_size: int) -> None:
        """``tasks/<task>/``, for every task whose expert is a Hugging Face folder (a warning for the others)."""
        from adamerge.tasks.hf import save_task_classifier

        encoder = {k: v for k, v in module.state_dict().items() if k.startswith(self.prefix + ".")}
        for name, task in self.tasks.items():
            target = inside(folder, folder / "tasks" / name)
            if not (Path(self.experts[name]) / "config.json").is_file():
                warnings.warn(f"task {name!r}: expert {self.experts[name]} has no config.json, so no {target} "
                              "(its head is in heads/)")
                continue
            save_task_classifier(encoder, task.head.as_dict(), self.experts[name], self.tokenizer, target, max_shard_size)

    def write_heads(self, folder: Path) -> None:
        for name, task in self.tasks.items():
            save_safetensors(task.head.as_dict(), inside(folder, folder / "heads" / f"{name}.safetensors"))

    def exported_key(self, key: str) -> str | None:
        """The encoder's tensors under the encoder's own names; the placeholder head left out."""
        return key[len(self.prefix) + 1:] if key.startswith(self.prefix + ".") else None

    def write_config(self, folder: Path) -> None:
        self.encoder_config.save_pretrained(folder)


def _label_ids(task: TaskConfig, expert) -> dict[str, int]:
    """Class name -> id for string labels: the task's ``label_names`` in order, else its expert's ``label2id``."""
    if task.label_names:
        return {name: i for i, name in enumerate(task.label_names)}
    config_file = Path(str(expert)) / "config.json"
    if config_file.is_file():
        return {str(k): int(v) for k, v in (json.loads(config_file.read_text()).get("label2id") or {}).items()}
    return {}


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
