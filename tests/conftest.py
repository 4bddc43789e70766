"""Shared tiny-model factories for the core tests.

Every family is a pristine pretrained model, a few experts (the pretrained weights plus
seeded noise, tied parameters kept tied) and an input. Tests deep-copy ``pretrained``
before handing it to ``MergedModel``, which freezes its backbone in place.
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
