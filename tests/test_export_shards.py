"""Hugging Face exports honour ``export.max_shard_size``: a small size gives several safetensors
shards and ``model.safetensors.index.json``, and ``from_pretrained`` opens them with the tensors
of the one-file export."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from adamerge.app.config import load_recipe, shard_size_bytes  # noqa: E402
from adamerge.app.problems import build_problem  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
WORDS = ["alpha", "beta", "gamma", "delta", "echo", "fox", "golf", "hotel", "india", "juliet"]


def word_tokenizer():
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])})


def assert_sharded_like(folder, whole, model_class):
    """``folder`` holds several shards and an index naming every tensor; opened with ``from_pretrained``
    it holds exactly the tensors of ``whole`` (the same export in one file)."""
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) >= 3 and shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert sorted(p.name for p in whole.glob("*.safetensors")) == ["model.safetensors"]
    sharded, single = model_class.from_pretrained(folder).state_dict(), model_class.from_pretrained(whole).state_dict()
    assert sorted(sharded) == sorted(single)
    for key, tensor in single.items():
        assert torch.equal(sharded[key], tensor), key


def test_hf_causal_lm_export_is_sharded_by_max_shard_size(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS) + 5, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    word_tokenizer().save_pretrained(tmp_path / "base")
    recipe = load_recipe({"problem": {"kind": "hf_causal_lm", "pretrained": str(tmp_path / "base"),
                                      "tasks": {"a": {"expert": str(tmp_path / "base"), "text": "q"}}}})
    problem = build_problem(recipe.problem)
    with torch.no_grad():
        problem.pretrained.model.norm.weight.add_(0.5)  # a merged model that is not the pretrained one
    problem.exporter.export(problem.pretrained, tmp_path / "small", shard_size_bytes("4KB"))
    problem.exporter.export(problem.pretrained, tmp_path / "whole", shard_size_bytes("5GB"))
    assert_sharded_like(tmp_path / "small", tmp_path / "whole", LlamaForCausalLM)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "small")
    assert torch.equal(reloaded.model.norm.weight, problem.pretrained.model.norm.weight)


def test_hf_sequence_classification_export_shards_encoder_and_task_classifiers(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "base")
    word_tokenizer().save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    config.num_labels = 3
    BertForSequenceClassification(config).save_pretrained(tmp_path / "a")
    recipe = load_recipe({"problem": {"kind": "hf_sequence_classification", "pretrained": str(tmp_path / "base"),
                                      "tasks": {"a": {"expert": str(tmp_path / "a")}}}})
    problem = build_problem(recipe.problem)
    problem.exporter.export(problem.pretrained, tmp_path / "small", shard_size_bytes("4KB"))
    problem.exporter.export(problem.pretrained, tmp_path / "whole", shard_size_bytes("5GB"))
    assert_sharded_like(tmp_path / "small", tmp_path / "whole", BertModel)  # the merged encoder
    assert_sharded_like(tmp_path / "small" / "tasks" / "a", tmp_path / "whole" / "tasks" / "a", BertForSequenceClassification)
