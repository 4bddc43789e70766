"""A plain task: a frozen head on the backbone's features under the given merged tensors, named
backbone modules captured as hidden layers, labels passed through; a head stays frozen and in eval."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adamerge import MergedModel, TaskVectors
from adamerge.tasks.base import HeadTask


@pytest.fixture
def merged():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    expert = copy.deepcopy(base)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(0.3)
    return MergedModel(copy.deepcopy(base), TaskVectors.from_models(base, [expert]), init=0.5)


def test_logits_are_the_head_on_the_features_of_the_given_tensors(merged):
    head = nn.Sequential(nn.Dropout(0.5), nn.Linear(2, 5))
    task = HeadTask("t", head, input_key="x", hidden_modules=["1"])
    assert not any(p.requires_grad for p in head.parameters())
    task.train()
    assert not head.training  # the head stays in eval mode (no dropout) while coefficients train
    x, labels = torch.randn(6, 3), torch.arange(6) % 5
    params = merged.merged_parameters()
    out = task(merged, params, {"x": x, "labels": labels}, hidden_layers=[0])
    hidden = torch.tanh(x @ params["0.weight"].T + params["0.bias"])
    features = hidden @ params["2.weight"].T + params["2.bias"]
    torch.testing.assert_close(out.hidden[0], hidden)
    torch.testing.assert_close(out.logits, head[1](features))
    assert torch.equal(out.labels, labels)
    expert = task(merged, merged.expert_parameters(0), {"x": x}).logits  # the same call on an expert's weights
    assert not torch.allclose(expert, out.logits) and task(merged, params, {"x": x}).labels is None


def test_a_hidden_layer_beyond_the_named_modules_is_refused(merged):
    task = HeadTask("t", input_key="x", hidden_modules=["1"])
    with pytest.raises(IndexError, match="task 't': hidden layer 1 requested but only 1 hidden_modules are named"):
        task(merged, merged.merged_parameters(), {"x": torch.randn(2, 3)}, hidden_layers=[1])
    assert torch.equal(task(merged, merged.merged_parameters(), {"x": torch.ones(1, 3)}).logits,
                       merged.forward_with(merged.merged_parameters(), torch.ones(1, 3)))  # no head: the features
