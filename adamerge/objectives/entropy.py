"""AdaMerging's objective: the Shannon entropy of the merged model's predictions.

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024
(arXiv:2310.02575): low entropy on a task's unlabelled test inputs correlates with low
loss, so coefficients are trained to make the merged model confident on every task.
"""

from __future__ import annotations

import torch
from torch import Tensor

from adamerge.objectives import Objective, register_objective


def prediction_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-row entropy ``-Σ_c p_c log p_c`` of ``softmax(logits / T)``, in nats."""
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


@register_objective("entropy")
class Entropy(Objective):
    """Mean per-sample prediction entropy (AdaMerging)."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, output, batch, task):
        return prediction_entropy(output.logits, self.temperature).mean()
