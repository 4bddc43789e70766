"""Scoring a causal LM on the SmolLM2 zoo's rows: label-word accuracy and answer perplexity.

The prediction is the label word with the highest summed log-likelihood of its tokens given the
prompt; the perplexity is that of the gold answer (label word and end of turn).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from adamerge.tasks.hf import quiet_transformers
from benchmarks.zoos.lm_rows import read_rows


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


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def right_pad(sequences: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


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
    pad = pad_id(tokenizer)
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
        ids, mask = right_pad(sequences, pad)
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
