"""Supervised cross-entropy and accuracy by hand; both need labels, and only accuracy scores validation rows."""

from __future__ import annotations

import pytest
import torch

from adamerge.objectives.supervised import Accuracy, CrossEntropy
from adamerge.tasks.base import TaskOutput


def test_cross_entropy_by_hand_and_needs_labels():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    loss = CrossEntropy()(TaskOutput(logits, labels=labels), {}, "t")
    log_p = torch.log_softmax(logits.double(), -1)
    assert float(loss) == pytest.approx(float(-(log_p[0, 0] + log_p[1, 2]) / 2), rel=1e-6)
    with pytest.raises(ValueError, match="needs labels.*'sst2'"):
        CrossEntropy()(TaskOutput(logits), {}, "sst2")


def test_accuracy_is_one_minus_the_share_of_right_predictions():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    score = Accuracy()(TaskOutput(logits, labels=torch.tensor([0, 2, 2, 1])), {}, "t")
    assert float(score) == pytest.approx(0.5)  # rows 0 and 2 right
    assert Accuracy.scores_validation and not CrossEntropy.scores_validation
    with pytest.raises(ValueError, match="accuracy needs labels.*'sst2'"):
        Accuracy()(TaskOutput(logits), {}, "sst2")
