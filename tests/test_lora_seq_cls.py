"""hf_sequence_classification tasks whose experts are PEFT LoRA adapters: the encoder's τ is the
adapter's ΔW and the task's head is the classifier PEFT saved whole, checked against the adapter
merged by peft itself (merge_and_unload); an adapter without a saved head is refused by name."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from adamerge import MergedModel, TaskVectors  # noqa: E402
from adamerge.app.config import load_recipe  # noqa: E402
from adamerge.app.problems import build_problem  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
WORDS = ["alpha", "beta", "gamma", "delta", "echo", "fox", "golf", "hotel", "india", "juliet"]


def bert_base(folder):
    """A tiny pretrained BERT classifier (2 placeholder labels) with a word tokenizer, saved."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    base = BertForSequenceClassification(config).eval()
    base.save_pretrained(folder)
    BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}).save_pretrained(folder)
    return base


def write_classifier_adapter(base_folder, folder, labels: int = 3, seed: int = 1, **lora):
    """A LoRA adapter on the pretrained encoder with a ``labels``-way head, factors and head set to
    seeded noise, saved by peft; returns peft's merged classifier (the reference)."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(base_folder, num_labels=labels, ignore_mismatched_sizes=True)
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], **lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "classifier" in name:
                param.copy_(0.3 * torch.randn_like(param))
    model.save_pretrained(folder)
    return copy.deepcopy(model).merge_and_unload().eval()


def problem_of(tmp_path, experts):
    recipe = load_recipe({"problem": {"kind": "hf_sequence_classification", "pretrained": str(tmp_path / "base"),
                                      "tasks": {name: {"expert": str(path)} for name, path in experts.items()}}})
    return build_problem(recipe.problem)


def test_a_lora_expert_gives_its_delta_w_and_saved_classifier_as_peft_merges_them(tmp_path):
    base = bert_base(tmp_path / "base")
    reference = write_classifier_adapter(tmp_path / "base", tmp_path / "a", task_type="SEQ_CLS")
    problem = problem_of(tmp_path, {"a": tmp_path / "a"})

    head = problem.tasks["a"].head.as_dict()
    assert sorted(head) == ["classifier.bias", "classifier.weight"] and problem.tasks["a"].num_labels == 3
    for key, tensor in head.items():
        assert torch.equal(tensor, reference.state_dict()[key]), key

    vectors = TaskVectors.from_models(problem.pretrained, problem.experts, include=problem.include)
    assert all(key.startswith("bert.") for key in vectors.keys)
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert vectors[query][0].abs().sum() > 0
    for key in vectors.keys:
        expected = reference.state_dict()[key] - base.state_dict()[key]
        torch.testing.assert_close(vectors[key][0], expected, rtol=0, atol=1e-6, msg=key)

    # the task at coefficient 1 is peft's merged classifier, logits and all
    merged = MergedModel(problem.pretrained, vectors, granularity="task", init=1.0)
    batch = problem.collate([{"input_ids": [2, 5, 7, 9, 3], "attention_mask": [1] * 5},
                             {"input_ids": [2, 11, 3], "attention_mask": [1] * 3}])
    with torch.no_grad():
        logits = problem.tasks["a"](merged, merged.merged_parameters(), batch).logits
        expected = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_a_lora_expert_without_a_saved_head_is_refused_naming_it_and_the_key(tmp_path):
    bert_base(tmp_path / "base")
    write_classifier_adapter(tmp_path / "base", tmp_path / "a", task_type="SEQ_CLS")
    write_classifier_adapter(tmp_path / "base", tmp_path / "b", labels=2)  # no task_type: the head is not saved
    with pytest.raises(KeyError, match=r"expert 'b' .*/b/adapter_model.safetensors: the adapter saves no classifier head "
                                       r"'classifier\.(weight|bias)'"):
        problem_of(tmp_path, {"a": tmp_path / "a", "b": tmp_path / "b"})
