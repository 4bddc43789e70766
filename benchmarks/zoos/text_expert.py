"""One MiniLM text expert: the shared starting point and the fine-tuning of a sequence classifier.

Every expert loads the pretrained checkpoint into ``AutoModelForSequenceClassification``. Only the
task head (``classifier.*``) may be missing from the checkpoint; it is initialised from ``seed``
explicitly, so the same seed gives the same head. MiniLM ships its pooler weights, so the experts
start from the checkpoint itself. Were any encoder weight (e.g. the pooler, which BERT's
classifier reads) missing, each expert would otherwise start from its own random draw and the task
vectors would be meaningless: :func:`save_shared_start` saves one seeded, complete encoder that
every expert starts from instead (:func:`benchmarks.zoos.text.build_text_zoo` does so).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from adamerge.io.checkpoints import atomic_directory, write_text
from adamerge.tasks.hf import quiet_transformers
from benchmarks.zoos.cache import EXPERT_META, torch_threads
from benchmarks.zoos.text_data import read_task_meta, task_rows
from benchmarks.zoos.training import adamw_with_warmup, save_expert, train_steps

FORMAT = "adamerge.zoo.text"  # the format tag of every expert's adamerge_expert.json and of zoo.json
VERSION = 1

# The defaults of finetune_text_expert (and so of the zoo build); chosen so that each of the six
# visible tasks gets a clearly good expert (agnews 89.3%, emotion 87.1%, sms_spam 99.0%, sst2 87.9%,
# subj 94.8%, trec 96.7% test accuracy) and the whole build stays well under 30-40 minutes on 2 CPU
# cores (0.2-0.6 s per step when the cores are free).
DEFAULTS = dict(
    seed=0,
    epochs=2,
    max_train=4000,
    max_length=128,
    batch_size=32,
    lr=1e-4,
    weight_decay=0.01,
    warmup_ratio=0.06,
)
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


# ---------------------------------------------------------------------- the starting point


def _load_classifier(pretrained: str | os.PathLike, meta: dict):
    """The checkpoint as a sequence classifier, and the names of the weights it did not hold."""
    from transformers import AutoModelForSequenceClassification

    with quiet_transformers():
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(pretrained),
            num_labels=meta["num_labels"],
            id2label=dict(enumerate(meta["label_names"])),
            label2id={name: i for i, name in enumerate(meta["label_names"])},
            output_loading_info=True,
        )
    return model, sorted(info.get("missing_keys", []))


def _encoder_keys(model, keys: Sequence[str]) -> list[str]:
    prefix = model.base_model_prefix + "."
    return [k for k in keys if k.startswith(prefix)]


def missing_encoder_weights(pretrained: str | os.PathLike, num_labels: int = 2) -> list[str]:
    """Weights of the encoder (not the task head) that ``pretrained`` lacks when loaded as a
    sequence classifier; they would be randomly initialised. Empty for all-MiniLM-L6-v2."""
    meta = {"num_labels": num_labels, "label_names": [str(i) for i in range(num_labels)]}
    model, missing = _load_classifier(pretrained, meta)
    return _encoder_keys(model, missing)


def _seeded_init_(model, names: Sequence[str], seed: int) -> None:
    """Initialise the parameters ``names`` from ``seed`` alone (BERT's scheme: normal weights
    with ``initializer_range``, zero biases, unit norm scales)."""
    generator = torch.Generator().manual_seed(int(seed))
    std = float(getattr(model.config, "initializer_range", 0.02))
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name in sorted(names):
            if name in buffers and name not in params:
                continue  # buffers (position ids) are rebuilt by the model itself
            if name not in params:
                raise KeyError(f"missing weight {name!r} is not a parameter of {type(model).__name__}")
            param = params[name]
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)


def save_shared_start(
    pretrained: str | os.PathLike, out_dir: str | os.PathLike, *, seed: int = 0
) -> Path:
    """Save ``pretrained``'s encoder with every weight it lacks (e.g. the pooler) initialised from
    ``seed``, atomically, as a checkpoint all experts can start from. Returns ``out_dir``."""
    from transformers import AutoTokenizer

    out_dir = Path(out_dir).expanduser()
    meta = {"num_labels": 2, "label_names": ["0", "1"]}
    model, missing = _load_classifier(pretrained, meta)
    encoder_missing = _encoder_keys(model, missing)
    _seeded_init_(model, encoder_missing, seed)
    tokenizer = AutoTokenizer.from_pretrained(str(pretrained))
    encoder = getattr(model, model.base_model_prefix)
    info = {
        "format": FORMAT,
        "version": VERSION,
        "kind": "shared_start",
        "source": str(pretrained),
        "seed": int(seed),
        "initialised": encoder_missing,
    }
    with atomic_directory(out_dir) as staging:
        with quiet_transformers():
            encoder.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        write_text(staging / EXPERT_META, json.dumps(info, indent=1) + "\n")
    return out_dir


# ---------------------------------------------------------------------- fine-tuning


def _length_grouped_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffled batches of similar-length rows (``group_by_length``): shuffle, sort by length
    inside windows of 50 batches, cut, shuffle the batches. Far less padding, same randomness."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


def _pad(tokenizer, encoded: dict, rows: Sequence[int]) -> dict:
    features = [{k: encoded[k][i] for k in encoded} for i in rows]
    return dict(tokenizer.pad(features, return_tensors="pt"))


@torch.no_grad()
def _evaluate(model, tokenizer, encoded: dict, labels: Sequence[int], batch_size: int) -> float:
    model.eval()
    lengths = [len(ids) for ids in encoded["input_ids"]]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    correct = 0
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        logits = model(**_pad(tokenizer, encoded, rows)).logits
        predicted = logits.argmax(-1)
        correct += int((predicted == torch.tensor([labels[i] for i in rows])).sum())
    return correct / len(order)


def _tokenize(tokenizer, texts, pairs, max_length: int) -> dict:
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    return {k: list(v) for k, v in encoded.items()}


def finetune_text_expert(
    pretrained: str | os.PathLike,
    task_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    seed: int = DEFAULTS["seed"],
    epochs: float = DEFAULTS["epochs"],
    max_train: int | None = DEFAULTS["max_train"],
    max_length: int = DEFAULTS["max_length"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    warmup_ratio: float = DEFAULTS["warmup_ratio"],
    max_steps: int | None = None,
    max_test: int | None = None,
    eval_batch_size: int = 128,
    num_threads: int | None = None,
    task: str | None = None,
    progress: bool = True,
) -> Path:
    """Fine-tune ``pretrained`` (a local HF directory) on the task in ``task_dir`` and save the
    expert to ``out_dir``; returns ``out_dir``.

    The model is ``AutoModelForSequenceClassification`` with ``meta.json``'s ``num_labels``; the
    head (every weight the checkpoint lacks) is initialised from ``seed``. The whole model is
    trained with AdamW (no decay on biases and norms), a linear warmup over ``warmup_ratio`` of
    the steps then linear decay to zero, default dropout, shuffled length-grouped batches; all
    randomness comes from ``seed``. ``max_train`` caps the training rows (a seeded sample);
    ``epochs`` may be fractional; ``max_steps`` (tests) caps the optimiser steps. Sentence-pair
    tasks (``meta.json`` ``pair``) pass ``text_pair`` to the tokenizer. Test accuracy (on the
    first ``max_test`` test rows when given) is stored with the settings in
    ``adamerge_expert.json``. The directory is written atomically: an interrupted run leaves
    nothing at ``out_dir``. Uses at most the CPU cores this process may run on
    (``num_threads`` overrides).
    """
    from transformers import AutoTokenizer

    started = time.perf_counter()
    task_dir, out_dir = Path(task_dir).expanduser(), Path(out_dir).expanduser()
    name = task or task_dir.name
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    if batch_size < 1 or max_length < 2:
        raise ValueError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size}, {max_length}")
    meta = read_task_meta(task_dir)
    train, test, n_available = task_rows(task_dir, meta, seed, max_train, max_test)
    settings = {
        "seed": int(seed), "epochs": epochs, "max_train": max_train, "max_length": int(max_length),
        "batch_size": int(batch_size), "lr": float(lr), "weight_decay": float(weight_decay),
        "warmup_ratio": float(warmup_ratio),
    }
    with torch_threads(num_threads) as threads:
        tokenizer = AutoTokenizer.from_pretrained(str(pretrained))
        train_enc = _tokenize(tokenizer, train[0], train[1], max_length)
        test_enc = _tokenize(tokenizer, test[0], test[1], max_length)
        model, missing = _start_model(pretrained, meta, seed, name)
        lengths = [len(ids) for ids in train_enc["input_ids"]]
        total_steps = max(1, math.ceil(epochs * math.ceil(len(lengths) / batch_size)))
        if max_steps is not None:
            total_steps = max(1, min(total_steps, int(max_steps)))
        warmup = int(round(warmup_ratio * total_steps))
        optimizer, scheduler = adamw_with_warmup(model, lr, weight_decay, warmup, total_steps, NO_DECAY)
        batches = _epochs_of_batches(tokenizer, train_enc, train[2], lengths, batch_size, seed)
        torch.manual_seed(int(seed))  # dropout
        losses, train_seconds = train_steps(model, batches, total_steps, optimizer, scheduler, desc=name, progress=progress)
        accuracy = _evaluate(model, tokenizer, test_enc, test[2], eval_batch_size)

    test_labels = test[2]
    counts = [test_labels.count(c) for c in range(meta["num_labels"])]
    window = max(1, len(losses) // 50)
    curve = [sum(losses[i:i + window]) / len(losses[i:i + window]) for i in range(0, len(losses), window)]
    info = {
        "format": FORMAT, "version": VERSION, "kind": "expert", "task": name,
        "label_names": meta["label_names"], "num_labels": meta["num_labels"], "pair": meta["pair"],
        "pretrained": str(pretrained), "data": str(task_dir),
        "test_accuracy": accuracy, "test_majority": max(counts) / len(test_labels),
        "n_train": len(train[2]), "n_train_available": n_available, "n_test": len(test_labels),
        "train": settings, "steps": total_steps, "warmup_steps": warmup, "threads": threads,
        "train_loss_first": losses[0], "train_loss_last": sum(losses[-window:]) / len(losses[-window:]),
        "loss_curve": {"window": window, "means": curve},
        "initialised_from_seed": missing, "train_seconds": train_seconds,
    }
    with atomic_directory(out_dir) as staging:
        save_expert(staging, model, tokenizer, info, started)
    return out_dir


def _start_model(pretrained, meta: dict, seed: int, name: str):
    """The classifier to fine-tune: the checkpoint's weights, and every weight it lacks (the head)
    initialised from ``seed``; a warning when the encoder itself lacks weights."""
    model, missing = _load_classifier(pretrained, meta)
    encoder_missing = _encoder_keys(model, missing)
    if encoder_missing:
        print(
            f"[{name}] warning: {pretrained} lacks encoder weights {encoder_missing[:4]}"
            f"{'...' if len(encoder_missing) > 4 else ''}; they are initialised from seed {seed}. "
            "Experts merged together must share them: build_text_zoo saves a shared start.",
            file=sys.stderr,
        )
    _seeded_init_(model, missing, seed)
    return model, missing


def _epochs_of_batches(tokenizer, encoded: dict, labels: list[int], lengths: list[int], batch_size: int, seed: int):
    """Shuffled length-grouped batches, epoch after epoch, all drawn from one ``seed``."""
    generator = torch.Generator().manual_seed(int(seed))
    while True:
        for rows in _length_grouped_batches(lengths, batch_size, generator):
            batch = _pad(tokenizer, encoded, rows)
            batch["labels"] = torch.tensor([labels[i] for i in rows])
            yield batch
