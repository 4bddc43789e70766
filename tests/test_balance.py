"""Each registered task balance by hand, and the registry's errors."""

from __future__ import annotations

import math

import pytest
import torch

from adamerge.learning.loss import TaskLoss
from adamerge.objectives.balance import BALANCES, register_balance


@pytest.mark.parametrize("name, loss, start, expected", [
    ("sum", -0.5, None, -0.5),
    ("log", 0.25, None, math.log(0.25 + 1e-6)),
    ("initial", 0.25, 0.5, 0.5),
    ("guarded", 0.25, 0.5, 0.25),  # improving: the plain loss
    ("guarded", 0.75, 0.5, 0.75 + 4.0 * 0.25),  # behind its start: 1 + ρ times the pull
])
def test_each_balance_by_hand(name, loss, start, expected):
    balance = BALANCES.get(name)
    assert balance.needs_start == (start is not None)
    assert float(balance.fn(torch.tensor(loss), start, 4.0)) == pytest.approx(expected)


def test_only_sum_accepts_negative_objectives_and_unknown_names_get_the_closest():
    assert [n for n, b in BALANCES.items() if not b.non_negative] == ["sum"]
    message = "unknown task balance 'lgo' (did you mean 'log'?); use one of ['guarded', 'initial', 'log', 'sum']"
    with pytest.raises(ValueError) as caught:
        BALANCES.get("lgo")
    assert str(caught.value) == message
    with pytest.raises(KeyError, match=r"unknown task balance 'lgo' \(did you mean 'log'\?\)"):
        TaskLoss({}, objective=None, task_balance="lgo")


def test_a_registered_balance_is_found_by_name_with_its_flags():
    @register_balance("_test_halved", needs_start=True, non_negative=False)
    def halved(loss, start, guard_weight):
        return loss / 2

    try:
        loss = TaskLoss({}, objective=None, task_balance="_test_halved")
        assert loss.balance.fn is halved and loss.balance.needs_start and not loss.balance.non_negative
        assert float(loss.balanced(torch.tensor(-3.0), "t", reference={"t": 1.0})) == -1.5  # negative: allowed
        with pytest.raises(ValueError, match="a task balance named '_test_halved' is already registered"):
            register_balance("_test_halved")(abs)
    finally:
        BALANCES.unregister("_test_halved")
