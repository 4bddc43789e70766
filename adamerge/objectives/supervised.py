"""Objectives of labelled rows: cross-entropy on labelled calibration data (e.g. FW-Merging's
objective), and accuracy, a score for derivative-free search on validation rows."""

from __future__ import annotations

import torch.nn.functional as F

from adamerge.objectives.base import OBJECTIVES, Objective


@OBJECTIVES.register("cross_entropy")
class CrossEntropy(Objective):
    """Mean cross-entropy of the merged model's logits against the batch's labels."""

    def forward(self, output, batch, task):
        if output.labels is None:
            raise ValueError(f"cross_entropy needs labels, and task {task!r}'s calibration data has none")
        return F.cross_entropy(output.logits.float(), output.labels)


@OBJECTIVES.register("accuracy")
class Accuracy(Objective):
    """``1 − accuracy`` of the merged model's predictions against the batch's labels (lower is
    better). It has no gradient: ``optimizer.name: cmaes`` minimises it on each task's validation rows."""

    scores_validation = True

    def forward(self, output, batch, task):
        if output.labels is None:
            raise ValueError(f"accuracy needs labels, and task {task!r}'s validation rows have none")
        return 1.0 - (output.logits.argmax(dim=-1) == output.labels).float().mean()
