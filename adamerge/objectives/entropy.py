"""AdaMerging's objective: the Shannon entropy of the merged model's predictions.

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024
(arXiv:2310.02575): low entropy on a task's unlabelled test inputs correlates with low
loss, so coefficients are trained to make the merged model confident on every task.
"""

from __future__ import annotations

import torch
from torch import Tensor

from adamerge.objectives.base import OBJECTIVES, Objective


def prediction_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-row entropy ``-Σ_c p_c log p_c`` of ``softmax(logits / T)``, in nats."""
    log_p = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


@OBJECTIVES.register("entropy")
class Entropy(Objective):
    """Mean per-sample prediction entropy (AdaMerging)."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, output, batch, task):
        return prediction_entropy(output.logits, self.temperature).mean()


@OBJECTIVES.register("infomax")
class InfoMax(Objective):
    """Entropy with a diversity term: ``mean_i H(p_i) − λ · H(mean_i p_i)``.

    Information maximisation (as in SHOT, Liang et al. 2020): confident per sample, but
    spread over classes across the batch, so the merge cannot win by predicting one class
    everywhere — the collapse plain entropy minimisation falls into on imbalanced or
    fine-grained tasks.
    """

    def __init__(self, diversity_weight: float = 1.0, temperature: float = 1.0):
        super().__init__()
        self.diversity_weight, self.temperature = diversity_weight, temperature

    def forward(self, output, batch, task):
        probabilities = torch.softmax(output.logits.float() / self.temperature, dim=-1)
        conditional = prediction_entropy(output.logits, self.temperature).mean()
        marginal = -(probabilities.mean(dim=0) * torch.log(probabilities.mean(dim=0) + 1e-12)).sum()
        loss = conditional - self.diversity_weight * marginal
        return loss, {"entropy": conditional.detach(), "marginal_entropy": marginal.detach()}
