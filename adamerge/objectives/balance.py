"""Task balance: how each task's loss is put on one scale before the tasks' losses are added.

A balance is ``fn(loss, start, guard_weight) -> balanced loss``, registered by name;
``start`` is the task's loss at the start of training (measured over its calibration set), for
the balances that declare ``needs_start``. Adding one is a function here and its test.

- ``sum``: as they are.
- ``log``: ``log(loss)``, so every task's *relative* decrease counts the same at every step.
- ``initial``: ``loss / loss_at_start``, fixed weights that put every task on the same footing.
- ``guarded``: ``loss + ρ·max(0, loss − loss_at_start)``, the plain sum while every task
  improves, with ``1 + ρ`` times the pull on any task that has fallen behind where it started.

All but ``sum`` need a non-negative objective, such as a KL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from adamerge.core.registry import Registry


@dataclass(frozen=True)
class Balance:
    fn: Callable[[Tensor, float | None, float], Tensor]
    needs_start: bool = False
    non_negative: bool = True


BALANCES: Registry[Balance] = Registry("task balance")
"""The balances by name (a recipe's ``task_balance``)."""


def register_balance(name: str, needs_start: bool = False, non_negative: bool = True):
    """Register ``fn(loss, start, guard_weight)`` under ``name`` with its flags: whether it
    needs the task's starting loss, and whether it needs a non-negative objective."""

    def decorate(fn):
        BALANCES.register(name, Balance(fn, needs_start, non_negative))
        return fn

    return decorate


@register_balance("sum", non_negative=False)
def plain_sum(loss: Tensor, start: float | None, guard_weight: float) -> Tensor:
    return loss


@register_balance("log")
def log_balance(loss: Tensor, start: float | None, guard_weight: float) -> Tensor:
    return torch.log(loss + 1e-6)


@register_balance("initial", needs_start=True)
def initial_balance(loss: Tensor, start: float | None, guard_weight: float) -> Tensor:
    return loss / max(start, 1e-6)


@register_balance("guarded", needs_start=True)
def guarded_balance(loss: Tensor, start: float | None, guard_weight: float) -> Tensor:
    return loss + guard_weight * torch.relu(loss - start)
