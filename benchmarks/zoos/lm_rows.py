"""The SmolLM2 zoo's instruction rows: each text task as prompt/response pairs a causal LM answers
with a label word.

The user message names the allowed answers and holds the text (cut to ``max_text_tokens``
tokens); the assistant answers with the label word (:data:`LABEL_WORDS`, lowercase, one token
each except where noted) and the end-of-turn token. The rows are written as
``<zoo_dir>/data/<task>/{train,test}.jsonl`` with columns ``prompt`` (the chat-templated prompt,
ending with the assistant-turn opener), ``response`` (label word + ``<|im_end|>``), ``label`` and
``text``, so that adamerge's ``hf_causal_lm`` problem kind reads them with ``text: prompt`` and
``response: response`` (its ``tokenize_prompts`` then marks exactly the response tokens; the
prompt string already holds the template's special tokens and the tokenizer adds none of its own).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from adamerge.io.checkpoints import write_text
from benchmarks.zoos.text_data import read_task_meta

FORMAT = "adamerge.zoo.lm"  # the format tag of the zoo's metadata: rows, experts and zoo.json
MAX_TEXT_TOKENS = 32  # texts are cut to their first 32 tokens by default
END_OF_TURN = "<|im_end|>"
SYSTEM = "You classify texts. Answer with one word."

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
                    max_text_tokens: int = MAX_TEXT_TOKENS) -> Path:
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
