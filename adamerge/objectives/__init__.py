"""Objectives: what the coefficients are trained to minimise, by registered name.

The protocol (:class:`Objective`) and the registry (``OBJECTIVES``) live in :mod:`.base`;
importing this package registers the built-in objectives (``entropy``, ``infomax``,
``alignment``, ``expert_kl``, ``l1_to_init``, ``cross_entropy``, ``accuracy``) and re-exports both.
Task balances, how tasks' losses add up, are :mod:`.balance`.
"""

from adamerge.objectives import alignment, entropy, supervised  # noqa: F401  (registers them)
from adamerge.objectives.base import (
    OBJECTIVES,
    FunctionObjective,
    Objective,
    ObjectiveContext,
    WeightedObjectives,
    build_objective,
    split_loss,
)

__all__ = [
    "OBJECTIVES",
    "FunctionObjective",
    "Objective",
    "ObjectiveContext",
    "WeightedObjectives",
    "build_objective",
    "split_loss",
]
