"""The collapse diagnostics the README's analysis rests on, against values computed by hand:
prediction histogram, mean per-sample entropy, entropy of the mean prediction, accuracy; and
the label check before training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from adamerge.learning.evaluate import check_labels, evaluate_task
from adamerge.core.merged import FunctionalModel
from adamerge.tasks.base import HeadTask

# two batches of fixed logits (the identity backbone hands the inputs through as logits)
LOGITS = [torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 1.0]]), torch.tensor([[3.0, 0.0]])]
LABELS = [torch.tensor([0, 1, 1]), torch.tensor([0])]


def _entropy(p):
    return -sum(x * math.log(x) for x in p if x > 0)


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_histogram_entropies_and_accuracy_equal_the_hand_computed_values():
    model = FunctionalModel(nn.Identity())
    task = HeadTask("t", input_key="x")
    batches = [{"x": x, "labels": y} for x, y in zip(LOGITS, LABELS)]
    result = evaluate_task(model, task, batches, params={}, device="cpu")
    rows = [r.tolist() for b in LOGITS for r in b]
    probabilities = [_softmax(r) for r in rows]
    mean = [sum(p[c] for p in probabilities) / 4 for c in range(2)]
    assert result["histogram"] == [3, 1]  # argmax: 0, 0, 1, 0
    assert result["samples"] == 4
    assert result["accuracy"] == pytest.approx(3 / 4)  # right: rows 0, 2, 3
    assert result["entropy"] == pytest.approx(sum(_entropy(p) for p in probabilities) / 4, rel=1e-6)
    assert result["mean_prediction_entropy"] == pytest.approx(_entropy(mean), rel=1e-6)
    assert result["max_entropy"] == pytest.approx(math.log(2))
    labels = [0, 1, 1, 0]
    assert result["loss"] == pytest.approx(-sum(math.log(p[y]) for p, y in zip(probabilities, labels)) / 4, rel=1e-6)
    assert "perplexity" not in result  # a classifier's rows are not tokens


def test_language_model_tasks_report_perplexity_of_their_tokens():
    from adamerge.tasks.base import TaskOutput

    class TokenTask(HeadTask):
        def forward(self, merged, params, batch, hidden_layers=()):
            logits = batch["x"]
            return TaskOutput(logits, labels=batch["labels"], sample_rows=torch.tensor([logits.shape[0]]))

    batches = [{"x": x, "labels": y} for x, y in zip(LOGITS, LABELS)]
    result = evaluate_task(FunctionalModel(nn.Identity()), TokenTask("lm"), batches, params={}, device="cpu")
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


def test_a_collapsed_task_shows_one_spike_and_a_near_zero_mean_prediction_entropy():
    model = FunctionalModel(nn.Identity())
    confident = torch.tensor([[20.0, 0.0, 0.0]] * 6)
    result = evaluate_task(model, HeadTask("t", input_key="x"), [{"x": confident}], params={}, device="cpu")
    assert result["histogram"] == [6, 0, 0] and "accuracy" not in result
    assert result["mean_prediction_entropy"] / result["max_entropy"] < 1e-6


def test_labels_outside_the_head_are_refused_before_training_naming_the_task_and_value():
    class Data:
        calibration = {"t": [{"label": 0}, {"label": 2}]}
        evaluation = {}

        def calibration_batches(self, name, batch_size):
            yield {"x": torch.zeros(1, 2)}

        def evaluation_batches(self, name, batch_size):
            return iter(())

    with pytest.raises(ValueError, match=r"task 't': calibration label 2 is outside its head's 2 classes \(0\.\.1\)"):
        check_labels(FunctionalModel(nn.Linear(2, 2)), {"t": HeadTask("t", input_key="x")}, Data())
