"""The SmolLM2 zoo: a real LLM (SmolLM2-135M-Instruct, 30 Llama layers, hidden 576, tied
embeddings) fully fine-tuned once per text task to answer an instruction with a label word,
reproducibly and offline on a CPU.

The shared start is SmolLM2 dequantised into ``<zoo_dir>/_shared/pretrained``
(:mod:`benchmarks.zoos.lm_expert`); each task's instruction rows are written into
``<zoo_dir>/data/<task>`` (:mod:`benchmarks.zoos.lm_rows`); experts are scored by
:mod:`benchmarks.zoos.lm_scoring`.

Zoo layout, as in :mod:`benchmarks.zoos.text`: ``<zoo_dir>/<task>/`` is a plain HF folder plus
``adamerge_expert.json`` (task, label words, settings, held-out label-word accuracy of the
expert and of the base model, seconds); ``<zoo_dir>/zoo.json`` records the shared start and
the settings. Experts are written in a hidden staging folder (``.<task>.partial-*``) renamed into
place only when complete; a rerun skips finished experts with the same settings.

Build: ``python -m benchmarks.zoos.lm --data ../shared/data/text [--out DIR]``. The defaults
(:data:`~benchmarks.zoos.lm_expert.DEFAULTS`: 60 AdamW steps of 8 rows at lr 1e-4, texts cut to
32 tokens, 128 held-out rows scored) are sized for 2 CPU cores: a step takes 4.5-9 s there, an
expert 5-9 minutes, the four about 25 minutes. 480 rows per task teach the task, not only the
answer format: held-out accuracy goes from 54.7 / 69.5 / 23.4 to 89.8 / 85.2 / 80.5 on subj /
sst2 / agnews (20 steps of 4 rows reach only 59 / 72 on subj / sst2).
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
from benchmarks.zoos.cache import ZOO_META, is_complete_expert, read_expert_meta, torch_threads, zoo_path
from benchmarks.zoos.lm_expert import (
    DEFAULT_TEST_ROWS, DEFAULTS, GGUF_FILE, VERSION, finetune_lm_expert, is_shared_start, save_dequantised,
)
from benchmarks.zoos.lm_rows import FORMAT, read_rows, write_task_rows
from benchmarks.zoos.lm_scoring import load_lm, score_rows

SHARED_START = Path("_shared") / "pretrained"
DATA_DIR = "data"
# Tasks where the base model is clearly below a fine-tuned expert (measured, see the zoo's table).
DEFAULT_TASKS = ("subj", "sst2", "agnews", "trec")
_SETTING_KEYS = tuple(DEFAULTS)


def default_zoo_dir() -> Path:
    """``$ADAMERGE_CACHE/zoo/smollm2-text`` (``ADAMERGE_CACHE`` defaults to ``~/.cache/adamerge``)."""
    return zoo_path("smollm2-text")


# ---------------------------------------------------------------------- the zoo


class LMZoo(dict):
    """``task -> expert directory``; ``pretrained`` the shared start, ``data`` the folder of the
    prompt/response rows (``<data>/<task>``), ``zoo_dir`` where the zoo lives."""

    pretrained: str
    data: Path
    zoo_dir: Path


def build_lm_zoo(
    data_root: str | os.PathLike,
    zoo_dir: str | os.PathLike | None = None,
    tasks: Sequence[str] | None = None,
    *,
    pretrained: str | os.PathLike | None = None,
    rebuild: bool = False,
    test_rows: int | None = DEFAULT_TEST_ROWS,
    progress: bool = True,
    num_threads: int | None = None,
    **settings,
) -> LMZoo:
    """One SmolLM2 expert per task (default :data:`DEFAULT_TASKS`) in ``zoo_dir/<task>`` (default
    :func:`default_zoo_dir`). ``pretrained`` (a HF causal-LM folder; tests) replaces the
    dequantised SmolLM2 saved at ``<zoo_dir>/_shared/pretrained``. Finished experts with the same
    settings are kept. ``settings`` override :data:`DEFAULTS`."""
    unknown = sorted(set(settings) - set(_SETTING_KEYS))
    if unknown:
        raise TypeError(f"unknown setting(s) {unknown}; known: {list(_SETTING_KEYS)}")
    data_root = Path(data_root).expanduser()
    zoo_dir = Path(zoo_dir).expanduser() if zoo_dir is not None else default_zoo_dir()
    names = list(tasks) if tasks is not None else list(DEFAULT_TASKS)
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"tasks must be unique and not empty, got {names}")
    for name in names:
        if not (data_root / name / "meta.json").is_file():
            raise FileNotFoundError(f"task {name!r}: {data_root / name}/meta.json does not exist")
    full = {**DEFAULTS, **settings}
    full = json.loads(json.dumps(full))
    if pretrained is None:
        start = zoo_dir / SHARED_START
        if rebuild or not is_shared_start(start):
            print(f"dequantising {GGUF_FILE} into {start}", file=sys.stderr)
            with torch_threads(num_threads or 2):
                save_dequantised(start)
    else:
        start = Path(pretrained).expanduser()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(start))
    data_out = zoo_dir / DATA_DIR
    for name in names:
        write_task_rows(tokenizer, data_root / name, data_out / name, name, full["max_text_tokens"])

    zoo = LMZoo()
    zoo.pretrained, zoo.data, zoo.zoo_dir = str(start), data_out, zoo_dir
    base_model = None
    for name in names:
        target = zoo_dir / name
        if not rebuild and is_complete_expert(target, FORMAT, full):
            print(f"[{name}] cached: {target}", file=sys.stderr)
        else:
            if target.exists():
                print(f"[{name}] rebuilding {target}", file=sys.stderr)
            with torch_threads(num_threads or 2):
                if base_model is None:
                    base_model, _ = load_lm(start)
                info = json.loads((data_out / name / "meta.json").read_text())
                base = score_rows(base_model, tokenizer, read_rows(data_out / name, "test", test_rows), info["label_words"])
            print(f"[{name}] base model: accuracy {100 * base['accuracy']:.1f}%, answer perplexity {base['perplexity']:.2f}",
                  file=sys.stderr)
            finetune_lm_expert(start, data_out / name, target, task=name, test_rows=test_rows, base_scores=base,
                               num_threads=num_threads, progress=progress, **full)
        zoo[name] = target
    previous = {}
    with contextlib.suppress(OSError, ValueError):
        previous = json.loads((zoo_dir / ZOO_META).read_text())
    experts = {**previous.get("experts", {}), **{name: name for name in names}}
    manifest = {"format": FORMAT, "version": VERSION, "pretrained": str(start), "data": str(data_out),
                "source": GGUF_FILE if pretrained is None else str(pretrained), "settings": full,
                "experts": dict(sorted(experts.items()))}
    write_text(zoo_dir / ZOO_META, json.dumps(manifest, indent=1) + "\n")
    return zoo


def open_lm_zoo(zoo_dir: str | os.PathLike | None = None, tasks: Sequence[str] | None = None) -> LMZoo:
    """A built zoo as :func:`build_lm_zoo` returns it, read from its ``zoo.json`` (nothing is
    trained); every expert named (default: all in the manifest) must be complete."""
    zoo_dir = Path(zoo_dir).expanduser() if zoo_dir is not None else default_zoo_dir()
    manifest_file = zoo_dir / ZOO_META
    if not manifest_file.is_file():
        raise FileNotFoundError(f"{manifest_file} does not exist: build the zoo with `python -m benchmarks.zoos.lm --data <text data root>`")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_file} is not a {FORMAT} manifest")
    names = list(tasks) if tasks is not None else list(manifest["experts"])
    zoo = LMZoo()
    zoo.pretrained, zoo.data, zoo.zoo_dir = manifest["pretrained"], Path(manifest["data"]), zoo_dir
    for name in names:
        folder = zoo_dir / manifest["experts"].get(name, name)
        if not is_complete_expert(folder, FORMAT):
            raise FileNotFoundError(f"expert {name!r}: {folder} is not a finished expert")
        zoo[name] = folder
    return zoo


# ---------------------------------------------------------------------- CLI


def table(zoo: LMZoo) -> str:
    lines = [f"{'task':<10} {'train':>6} {'test':>5} {'base acc':>8} {'expert acc':>10} {'base ppl':>9} "
             f"{'expert ppl':>10} {'seconds':>8}"]
    total = 0.0
    for name, directory in zoo.items():
        m = read_expert_meta(directory)
        total += m.get("seconds", 0.0)
        base = m.get("base_test_accuracy")
        base_ppl = m.get("base_test_perplexity")
        lines.append(
            f"{name:<10} {m['n_train']:>6} {m['n_test']:>5} {'' if base is None else f'{100 * base:.1f}%':>8} "
            f"{100 * m['test_accuracy']:>9.1f}% {'' if base_ppl is None else f'{base_ppl:.2f}':>9} "
            f"{m['test_perplexity']:>10.2f} {m.get('seconds', 0.0):>8.1f}"
        )
    lines.append(f"{'total':<10} {'':>6} {'':>5} {'':>8} {'':>10} {'':>9} {'':>10} {total:>8.1f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zoos.lm",
                                     description="Fine-tune one SmolLM2-135M-Instruct expert per text task (resumable).")
    parser.add_argument("--data", required=True, help="data root holding <task>/{train,test}.jsonl and meta.json")
    parser.add_argument("--out", default=None, help=f"zoo directory (default: {default_zoo_dir()})")
    parser.add_argument("--tasks", nargs="+", default=None, help=f"tasks (default: {' '.join(DEFAULT_TASKS)})")
    parser.add_argument("--pretrained", default=None, help="a HF causal-LM folder instead of the dequantised SmolLM2")
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--test-rows", type=int, default=DEFAULT_TEST_ROWS, help="held-out rows scored per task")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    zoo = build_lm_zoo(args.data, args.out, args.tasks, pretrained=args.pretrained, rebuild=args.rebuild,
                       test_rows=args.test_rows, progress=not args.no_progress, num_threads=args.threads,
                       **{k: getattr(args, k) for k in DEFAULTS})
    print(table(zoo))
    print(f"zoo: {zoo.zoo_dir}  (pretrained: {zoo.pretrained}; data: {zoo.data})  "
          f"wall time {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    sys.exit(main())
