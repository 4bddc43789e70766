"""Hugging Face settings: sequence classifiers with per-task heads, CLIP zero-shot, causal LMs.

- Sequence classification: K ``XForSequenceClassification`` experts fine-tuned from one
  encoder. The encoder (``model.base_model``) is merged; each task keeps its expert's own
  head, swapped into the same backbone per task. Single sentences and sentence pairs.
- CLIP: the vision tower (+ projection) is merged; each task's logits come from zero-shot
  text embeddings of its class names, made once with the pretrained text tower.
- Causal LM: the whole model is merged; logits are the LM head's next-token predictions
  at the response tokens (all tokens when there is no response).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adamerge.io.checkpoints import WeightsSource, open_weights
from adamerge.core.skeleton import parameters_on_meta
from adamerge.tasks.base import Task, TaskOutput


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' expected 'newly initialised weights' notices while loading."""
    from transformers.utils import logging

    previous = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(previous)
        if bars:
            logging.enable_progress_bar()


class _TensorStore(nn.Module):
    """Frozen named tensors (names may contain dots) as non-persistent buffers."""

    def __init__(self, tensors: Mapping[str, Tensor]):
        super().__init__()
        self.names = list(tensors)
        for i, name in enumerate(self.names):
            self.register_buffer(f"t{i}", tensors[name].detach().clone(), persistent=False)

    def as_dict(self) -> dict[str, Tensor]:
        return {name: getattr(self, f"t{i}") for i, name in enumerate(self.names)}


def _fingerprint(dataset, tokenizer, *settings) -> str:
    """A cheap cache key for a tokenising pass (``datasets`` would otherwise hash the whole tokenizer)."""
    import hashlib

    identity = (dataset._fingerprint, type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer), settings)
    return hashlib.sha256(repr(identity).encode()).hexdigest()[:32]


def _hidden(outputs, hidden_layers: Sequence[int]) -> dict[int, Tensor]:
    if not hidden_layers:
        return {}
    states = outputs.hidden_states
    for index in hidden_layers:
        if not -len(states) <= index < len(states):
            raise IndexError(f"hidden layer {index} requested but the model returns {len(states)} hidden states")
    return {index: states[index] for index in hidden_layers}


# ---------------------------------------------------------------------- sequence classification


class SequenceClassificationTask(Task):
    """A task of merged sequence classifiers: the merged encoder with this task's own head."""

    INPUTS = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self, name: str, head: Mapping[str, Tensor]):
        super().__init__(name)
        self.head = _TensorStore(head)
        self.num_labels = int(list(head.values())[-1].shape[0])  # HF heads end with the output layer

    def forward(self, merged, params, batch, hidden_layers=()):
        inputs = {k: batch[k] for k in self.INPUTS if k in batch}
        outputs = merged.forward_with(
            {**params, **self.head.as_dict()}, **inputs, output_hidden_states=bool(hidden_layers), return_dict=True
        )
        return TaskOutput(
            outputs.logits, _hidden(outputs, hidden_layers), batch.get("attention_mask"), labels=batch.get("labels")
        )


def head_keys(model: nn.Module, weights: Mapping[str, Tensor]) -> list[str]:
    """Keys outside the model's base (encoder) prefix: the task-specific head."""
    prefix = model.base_model_prefix + "."
    return [k for k in weights if not k.startswith(prefix)]


def torch_dtype(dtype: str) -> str | torch.dtype:
    """A recipe's ``problem.dtype`` as ``from_pretrained`` takes it (``"auto"``: the checkpoint's own)."""
    return dtype if dtype == "auto" else getattr(torch, dtype)


def load_sequence_classifier(pretrained: str, num_labels: int = 2, empty: bool = False, dtype: str = "auto") -> nn.Module:
    """The backbone: a sequence classifier holding the pretrained encoder (its head is a placeholder).
    ``empty``: its structure only, every parameter on ``meta`` (a streamed run reads them later)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    with quiet_transformers():
        if empty:
            config = AutoConfig.from_pretrained(pretrained, num_labels=num_labels)
            with parameters_on_meta():
                return AutoModelForSequenceClassification.from_config(config, **_config_dtype(dtype)).eval()
        return AutoModelForSequenceClassification.from_pretrained(pretrained, num_labels=num_labels, dtype=torch_dtype(dtype)).eval()


def _config_dtype(dtype: str) -> dict:
    """``from_config``'s dtype argument: none for ``auto`` (the config's own)."""
    return {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}


def sequence_classification_tasks(
    backbone: nn.Module, experts: Mapping[str, WeightsSource]
) -> tuple[dict[str, SequenceClassificationTask], str]:
    """One task per expert with that expert's head, and the regex of the merge scope (the encoder)."""
    tasks = {}
    for name, source in experts.items():
        weights = open_weights(source, f"expert {name!r}")
        keys = head_keys(backbone, weights)
        if not keys or len(keys) == len(weights):  # all keys outside the prefix: a bare encoder, not a classifier
            raise KeyError(f"expert {name!r} has no head outside {backbone.base_model_prefix!r}: is it a sequence classifier?")
        tasks[name] = SequenceClassificationTask(name, {k: weights[k] for k in keys})
    return tasks, f"^{backbone.base_model_prefix}\\."


def save_task_classifier(
    encoder: Mapping[str, Tensor], head: Mapping[str, Tensor], expert: str, tokenizer, folder, max_shard_size: int | str = "5GB"
) -> None:
    """One task as a complete ``XForSequenceClassification`` folder (the merged encoder, the task's
    head, its expert's config with ``num_labels``/``id2label``, the tokenizer), so that
    ``from_pretrained`` and ``pipeline`` open what was merged, not the encoder alone."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(expert))
    model.load_state_dict({**encoder, **head}, strict=True)
    with quiet_transformers():
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(folder)


def _labels_of(rows: list[Mapping]) -> dict[str, Tensor]:
    return {"labels": torch.tensor([int(row["label"]) for row in rows])} if rows and "label" in rows[0] else {}


class text_collate:  # noqa: N801 - used as a function; a class so that ddp_spawn can pickle it
    """Pad tokenised rows to the longest in the batch; ``label`` becomes ``labels``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, rows: list[Mapping]) -> dict[str, Tensor]:
        features = [{k: v for k, v in row.items() if k in SequenceClassificationTask.INPUTS} for row in rows]
        return {**dict(self.tokenizer.pad(features, return_tensors="pt")), **_labels_of(rows)}


def tokenize_text(
    dataset, tokenizer, text: str, text_pair: str | None, label: str | None, max_length: int, task: str,
    label_ids: Mapping[str, int] | None = None, labels_needed: bool = True,
):
    """Tokenise a ``datasets.Dataset`` of sentences (or pairs); keeps only model inputs and ``label``.

    String labels (``"pos"``) become class ids through ``label_ids``. Where labels are not
    needed (calibration rows of a label-free objective), strings that cannot be mapped are
    dropped rather than refused; where they are (evaluation), an unknown one is an error."""
    for column in [text, text_pair]:
        if column and column not in dataset.column_names:
            raise KeyError(f"task {task!r}: column {column!r} not in the data (columns: {dataset.column_names})")
    if label and label in dataset.column_names and dataset.features[label].dtype in ("string", "large_string"):
        dataset = _label_ids(dataset, label, label_ids or {}, task, labels_needed)

    def encode(rows):
        pair = rows[text_pair] if text_pair else None
        return tokenizer(rows[text], pair, truncation=True, max_length=max_length)

    keep_label = label if label and label in dataset.column_names else None
    tokenized = dataset.map(
        encode,
        batched=True,
        remove_columns=[c for c in dataset.column_names if c != keep_label],
        new_fingerprint=_fingerprint(dataset, tokenizer, text, text_pair, max_length),
    )
    if keep_label and keep_label != "label":
        tokenized = tokenized.rename_column(keep_label, "label")
    return tokenized


def _label_ids(dataset, label: str, label_ids: Mapping[str, int], task: str, needed: bool):
    """String labels replaced by their class ids (or the column dropped, when not needed and unmappable)."""
    unknown = sorted(set(dataset[label]) - set(label_ids))
    if unknown and not needed:
        return dataset.remove_columns(label)
    if unknown:
        known = sorted(label_ids, key=label_ids.get)
        raise ValueError(
            f"task {task!r}: label {unknown[0]!r} is not a class name of its expert ({known}); "
            "set the task's label_names or the expert config's label2id"
        )
    return dataset.map(lambda row: {label: label_ids[row[label]]}, new_fingerprint=f"{dataset._fingerprint}-ids")


# ---------------------------------------------------------------------- CLIP zero-shot

DEFAULT_TEMPLATES = ("a photo of a {}.",)


class CLIPZeroShotTask(Task):
    """Merged CLIP vision tower; logits = scale · cos(image embedding, class-prompt embeddings)."""

    def __init__(self, name: str, class_embeddings: Tensor, logit_scale: float):
        super().__init__(name)
        self.register_buffer("class_embeddings", F.normalize(class_embeddings.detach(), dim=-1), persistent=False)
        self.logit_scale = float(logit_scale)

    def forward(self, merged, params, batch, hidden_layers=()):
        outputs = merged.forward_with(
            params, pixel_values=batch["pixel_values"], output_hidden_states=bool(hidden_layers), return_dict=True
        )
        image = F.normalize(outputs.image_embeds, dim=-1)
        logits = self.logit_scale * image @ self.class_embeddings.to(image.dtype).T
        return TaskOutput(logits, _hidden(outputs, hidden_layers), labels=batch.get("labels"))


@torch.no_grad()
def clip_class_embeddings(clip_model: nn.Module, tokenizer, classnames: Sequence[str], templates=DEFAULT_TEMPLATES) -> Tensor:
    """Mean of the normalised text embeddings of every template per class (the standard zero-shot head)."""
    per_class = []
    for classname in classnames:
        prompts = [template.format(classname) for template in templates]
        inputs = tokenizer(prompts, padding=True, return_tensors="pt")
        features = clip_model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        features = features if isinstance(features, Tensor) else features.pooler_output
        per_class.append(F.normalize(features, dim=-1).mean(dim=0))
    return torch.stack(per_class)


def load_clip(pretrained: str, dtype: str = "auto") -> tuple[nn.Module, nn.Module]:
    """(vision backbone with projection, full CLIP model for the text tower) from one directory."""
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    with quiet_transformers():
        vision = CLIPVisionModelWithProjection.from_pretrained(pretrained, dtype=torch_dtype(dtype)).eval()
        full = CLIPModel.from_pretrained(pretrained, dtype=torch_dtype(dtype)).eval()
    return vision, full


class image_collate:  # noqa: N801 - used as a function; a class so that ddp_spawn can pickle it
    """Turn rows with an image (PIL or array) into ``pixel_values``; ``label`` becomes ``labels``."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, rows: list[Mapping]) -> dict[str, Tensor]:
        images = [row["image"] for row in rows]
        return {"pixel_values": self.processor(images=images, return_tensors="pt")["pixel_values"], **_labels_of(rows)}


# ---------------------------------------------------------------------- causal LM


class CausalLMTask(Task):
    """Merged causal LM; one prediction row per target token (``loss_mask`` marks them)."""

    def forward(self, merged, params, batch, hidden_layers=()):
        outputs = merged.forward_with(
            params,
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=bool(hidden_layers),
            return_dict=True,
        )
        targets = batch["loss_mask"][:, 1:].bool()
        return TaskOutput(
            logits=outputs.logits[:, :-1][targets],
            hidden=_hidden(outputs, hidden_layers),
            mask=batch["attention_mask"],
            sample_rows=targets.sum(dim=1),
            labels=batch["input_ids"][:, 1:][targets],
        )


def load_causal_lm(pretrained: str, empty: bool = False, dtype: str = "auto") -> nn.Module:
    """The pretrained causal LM; ``empty``: its structure only, parameters on ``meta``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with quiet_transformers():
        if empty:
            with parameters_on_meta():
                return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(pretrained), **_config_dtype(dtype)).eval()
        return AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch_dtype(dtype)).eval()


def tokenize_prompts(dataset, tokenizer, text: str, response: str | None, max_length: int, task: str):
    """Tokenise prompts (+ responses); ``loss_mask`` marks response tokens, or every token without responses."""
    for column in [text, response]:
        if column and column not in dataset.column_names:
            raise KeyError(f"task {task!r}: column {column!r} not in the data (columns: {dataset.column_names})")

    def encode(row):
        prompt = tokenizer(row[text], add_special_tokens=True)["input_ids"]
        answer = tokenizer(row[response], add_special_tokens=False)["input_ids"] if response else []
        ids = (prompt + answer)[:max_length]
        mask = ([0] * len(prompt) + [1] * len(answer))[:max_length] if response else [1] * len(ids)
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "loss_mask": mask}

    return dataset.map(
        encode,
        remove_columns=dataset.column_names,
        new_fingerprint=_fingerprint(dataset, tokenizer, text, response, max_length),
    )


class lm_collate:  # noqa: N801 - used as a function; a class so that ddp_spawn can pickle it
    """Right-pad ``input_ids``/``attention_mask``/``loss_mask`` to the longest row."""

    def __init__(self, tokenizer):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, rows: list[Mapping]) -> dict[str, Tensor]:
        length = max(len(row["input_ids"]) for row in rows)
        pads = (("input_ids", self.pad_id), ("attention_mask", 0), ("loss_mask", 0))
        return {key: torch.tensor([list(row[key]) + [pad] * (length - len(row[key])) for row in rows]) for key, pad in pads}
