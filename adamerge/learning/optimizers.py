"""The one optimiser table every gradient learner builds its optimiser from (``optimizer.name`` in
a recipe), and the derivative-free searches a recipe may name instead (each its own learner).

Coefficients are few and float32, so plain first-order optimisers suffice; progressive
distillation uses the paper's Adam at lr 0.01, AdaMerging Adam at lr 1e-3.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}
SEARCHES = ("cmaes",)  # no torch optimiser: CMA-ES, adamerge.learning.evolution


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``OPTIMIZERS[name]`` over ``params``; an unknown name is refused with the known ones."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; use one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay)
