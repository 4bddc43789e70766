"""Cross-entropy on labelled calibration data, for when labels exist (e.g. FW-Merging's objective)."""

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
