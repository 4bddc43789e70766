"""Supervised cross-entropy by hand; it needs labels."""

from __future__ import annotations

import pytest
import torch

from adamerge.objectives.supervised import CrossEntropy
from adamerge.tasks.base import TaskOutput


def test_cross_entropy_by_hand_and_needs_labels():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    loss = CrossEntropy()(TaskOutput(logits, labels=labels), {}, "t")
    log_p = torch.log_softmax(logits.double(), -1)
    assert float(loss) == pytest.approx(float(-(log_p[0, 0] + log_p[1, 2]) / 2), rel=1e-6)
    with pytest.raises(ValueError, match="needs labels.*'sst2'"):
        CrossEntropy()(TaskOutput(logits), {}, "sst2")
