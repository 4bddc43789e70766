"""The one optimiser table (adamerge.learning.optimizers): the recipe's names (the table's and the
derivative-free searches'), and the same table for the Lightning learner and progressive distillation."""

import typing

import pytest
import torch

from adamerge.app.config import OptimizerConfig
from adamerge.learning.optimizers import OPTIMIZERS, SEARCHES, build_optimizer


def test_the_recipe_choices_are_the_table():
    choices = typing.get_args(typing.get_type_hints(OptimizerConfig)["name"])
    assert set(choices) == set(OPTIMIZERS) | set(SEARCHES) and not set(OPTIMIZERS) & set(SEARCHES)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_optimizer_takes_its_lr_and_weight_decay(name):
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = build_optimizer(name, [param], lr=0.5, weight_decay=0.1)
    assert isinstance(optimizer, OPTIMIZERS[name])
    assert optimizer.param_groups[0]["lr"] == 0.5 and optimizer.param_groups[0]["weight_decay"] == 0.1


def test_an_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="unknown optimizer 'lion'; use one of \\['adam', 'adamw', 'sgd'\\]"):
        build_optimizer("lion", [torch.nn.Parameter(torch.ones(1))], lr=1.0)
