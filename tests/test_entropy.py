"""Entropy minimisation and InfoMax against hand computations: the mean prediction entropy (and its
coefficient gradient, against autograd on an explicitly merged module), and the diversity term that
rewards spread predictions."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from adamerge.objectives.entropy import Entropy, InfoMax
from adamerge.tasks.base import HeadTask, TaskOutput

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_entropy_equals_hand_computation(kit, temperature):
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.1, 0.1], [5.0, -3.0, 1.0], [-0.5, 0.7, 0.2]])
    loss = Entropy(temperature)(TaskOutput(logits), {}, "t")
    expected = kit.hand_entropy(logits, temperature).mean()
    assert loss.dim() == 0
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    # uniform logits: log C
    assert float(Entropy()(TaskOutput(torch.zeros(2, 5)), {}, "t")) == pytest.approx(math.log(5), rel=1e-6)


def test_entropy_gradient_matches_explicit_module(kit):
    """∂H/∂c_k for every layer equals <∂H/∂θ_layer, τ_k> computed by autograd on a plain module."""
    base, experts, merged = kit.mlp_merge("layer")
    with torch.no_grad():
        merged.coefficients.raw.copy_(torch.tensor([[0.3, 0.5, -0.2, 0.7, 0.1, 0.4], [0.6, -0.1, 0.2, 0.3, 0.9, 0.0]]))
    task = HeadTask("t0")
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(4))
    batch = {"inputs": x}
    loss = Entropy()(task(merged, merged.merged_parameters(), batch), batch, "t0")
    loss.backward()
    grad = merged.coefficients.raw.grad

    # reference: a plain copy holding θ = θ_0 + Σ_k c_k τ_k as leaf tensors
    names = list(merged.layout.slot_names)
    coefficient = merged.coefficients().detach()
    reference = copy.deepcopy(base)
    taus = {}
    with torch.no_grad():
        for key, param in reference.named_parameters():
            taus[key] = [experts[e].state_dict()[key] - base.state_dict()[key] for e in ("t0", "t1")]
            slot = names.index(key)
            param.copy_(base.state_dict()[key] + sum(coefficient[k, slot] * taus[key][k] for k in range(2)))
    reference.requires_grad_(True)
    ref_loss = kit.hand_entropy(reference(x)).mean()
    ref_loss.backward()
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    for key, param in reference.named_parameters():
        slot = names.index(key)
        for k in range(2):
            expected = (param.grad * taus[key][k]).sum()
            torch.testing.assert_close(grad[k, slot], expected.float(), rtol=1e-4, atol=1e-7, msg=f"{key} expert {k}")
    assert grad.abs().sum() > 0


def test_infomax_equals_hand_computation():
    logits = torch.tensor([[3.0, 0.0, -1.0], [2.5, 0.5, 0.0], [0.0, 0.1, 2.0], [1.0, 1.0, 1.0]])
    lam, T = 0.7, 2.0
    loss, logs = InfoMax(diversity_weight=lam, temperature=T)(TaskOutput(logits), {}, "t")
    p = torch.softmax(logits.double() / T, dim=-1)
    conditional = (-(p * p.log()).sum(dim=-1)).mean()
    mean_p = p.mean(dim=0)
    marginal = -(mean_p * mean_p.log()).sum()
    assert float(loss) == pytest.approx(float(conditional - lam * marginal), rel=1e-5)
    assert float(logs["entropy"]) == pytest.approx(float(conditional), rel=1e-5)
    assert float(logs["marginal_entropy"]) == pytest.approx(float(marginal), rel=1e-5)
    # the diversity term rewards spreading: the same confident prediction everywhere scores worse
    collapsed = torch.tensor([[5.0, 0.0, 0.0]] * 3)
    spread = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    infomax = InfoMax()
    assert float(infomax(TaskOutput(spread), {}, "t")[0]) < float(infomax(TaskOutput(collapsed), {}, "t")[0])
    assert float(Entropy()(TaskOutput(spread), {}, "t")) == pytest.approx(float(Entropy()(TaskOutput(collapsed), {}, "t")))
