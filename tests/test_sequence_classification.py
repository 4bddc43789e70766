"""The ``hf_sequence_classification`` kind (adamerge.app.problems.sequence_classification) over
conftest's tiny BERT zoo, and its exporter through the files it writes: the merged encoder and its
tokenizer, each task's complete classifier and bare head; streamed, the encoder's own tensor names
and config. (Sharding by export.max_shard_size: test_export_shards.py; a whole run: test_export.py;
LoRA experts: test_lora_seq_cls.py.)"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from adamerge.app.config import load_recipe  # noqa: E402
from adamerge.app.problems import build_problem  # noqa: E402
from adamerge.io.checkpoints import open_weights  # noqa: E402
from adamerge.tasks.hf import SequenceClassificationTask  # noqa: E402


def problem_of(zoo, experts, streamed=False, **task):
    tasks = {name: {"expert": str(path), **task} for name, path in experts.items()}
    recipe = load_recipe({"problem": {"kind": "hf_sequence_classification", "pretrained": str(zoo / "base"),
                                      "max_length": 32, "tasks": tasks}})
    return build_problem(recipe.problem, streamed=streamed)


def test_each_task_keeps_its_experts_head_and_reads_its_data(zoo):
    problem = problem_of(zoo, {"a": zoo / "zoo" / "a"}, calibration={"path": str(zoo / "data" / "a")},
                         evaluation={"path": str(zoo / "data" / "a")})
    head = problem.tasks["a"].head.as_dict()
    expert = open_weights(str(zoo / "zoo" / "a"))
    assert isinstance(problem.tasks["a"], SequenceClassificationTask) and problem.include == [r"^bert\."]
    assert sorted(head) == ["classifier.bias", "classifier.weight"] and all(torch.equal(v, expert[k]) for k, v in head.items())
    assert len(problem.calibration["a"]) == len(problem.evaluation["a"]) == 20
    batch = problem.collate([problem.evaluation["a"][i] for i in range(3)])
    assert batch["labels"].tolist() == [0, 1, 0] and batch["input_ids"].shape[0] == 3


def test_the_export_is_the_encoder_with_its_tokenizer_each_tasks_classifier_and_head(zoo, tmp_path):
    from transformers import AutoTokenizer, BertForSequenceClassification, BertModel

    shutil.copy(zoo / "zoo" / "b" / "model.safetensors", tmp_path / "b.safetensors")  # an expert with no config.json
    problem = problem_of(zoo, {"a": zoo / "zoo" / "a", "b": tmp_path / "b.safetensors"})
    merged = problem.pretrained
    with torch.no_grad():
        merged.bert.pooler.dense.bias.add_(1.0)  # a merged encoder that is not the pretrained one
    with pytest.warns(UserWarning, match=r"task 'b': expert .*b.safetensors has no config.json, so no .*tasks/b"):
        problem.exporter.export(merged, tmp_path / "merged", 10**9)
    folder = tmp_path / "merged"
    encoder = BertModel.from_pretrained(folder)
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in merged.bert.state_dict().items())
    assert AutoTokenizer.from_pretrained(folder).tokenize("the cat") == ["the", "cat"]
    assert sorted(p.name for p in (folder / "tasks").iterdir()) == ["a"]
    classifier = BertForSequenceClassification.from_pretrained(folder / "tasks" / "a")
    assert classifier.config.num_labels == 2
    assert torch.equal(classifier.bert.pooler.dense.bias, merged.bert.pooler.dense.bias)
    for name in ("a", "b"):
        head = open_weights(str(folder / "heads" / f"{name}.safetensors"))
        assert all(torch.equal(head[k], v) for k, v in problem.tasks[name].head.as_dict().items())
    assert torch.equal(classifier.classifier.weight, problem.tasks["a"].head.as_dict()["classifier.weight"])


def test_a_streamed_export_names_the_encoders_tensors_as_the_encoder_does(zoo, tmp_path):
    from transformers import AutoConfig

    problem = problem_of(zoo, {"a": zoo / "zoo" / "a"}, streamed=True)
    assert next(problem.pretrained.parameters()).device.type == "meta"
    assert sorted(problem.pretrained_weights) == sorted(open_weights(str(zoo / "base")))
    assert problem.exporter.exported_key("bert.encoder.layer.0.output.dense.weight") == "encoder.layer.0.output.dense.weight"
    assert problem.exporter.exported_key("classifier.weight") is None
    problem.exporter.write_config(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == "bert" and config.hidden_size == 16
