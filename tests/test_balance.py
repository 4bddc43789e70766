"""Each registered task balance by hand, and the registry's errors."""

from __future__ import annotations

import math

import pytest
import torch

from adamerge.objectives.balance import BALANCES, get_balance


@pytest.mark.parametrize("name, loss, start, expected", [
    ("sum", -0.5, None, -0.5),
    ("log", 0.25, None, math.log(0.25 + 1e-6)),
    ("initial", 0.25, 0.5, 0.5),
    ("guarded", 0.25, 0.5, 0.25),  # improving: the plain loss
    ("guarded", 0.75, 0.5, 0.75 + 4.0 * 0.25),  # behind its start: 1 + ρ times the pull
])
def test_each_balance_by_hand(name, loss, start, expected):
    balance = get_balance(name)
    assert balance.needs_start == (start is not None)
    assert float(balance.fn(torch.tensor(loss), start, 4.0)) == pytest.approx(expected)


def test_only_sum_accepts_negative_objectives_and_unknown_names_are_refused():
    assert [n for n, b in BALANCES.items() if not b.non_negative] == ["sum"]
    with pytest.raises(ValueError, match="unknown task_balance 'lgo'"):
        get_balance("lgo")
