"""OPCM (sequential_projection) by hand in float64 with numpy's full SVD: each new task vector loses
its components along the running update's singular pairs and between its top-r directions, so it
is orthogonal to the merge so far; the merge is n̄ S/‖S‖; one expert is itself; the experts are read
one at a time."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from torch import nn

from adamerge.methods import METHODS
from adamerge.methods.sequential_projection import project_out
from fixtures.families import perturbed


def matrix(seed: int, shape=(5, 4), spectrum=None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if spectrum is None:
        return torch.randn(*shape, generator=generator)
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=generator))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=generator))
    return u[:, :len(spectrum)] @ torch.diag(torch.tensor(spectrum)) @ v[:, :len(spectrum)].T


def hand_projection(update: np.ndarray, tau: np.ndarray, alpha: float) -> np.ndarray:
    """The rule as the paper's reference states it: full SVD of the update, P = Uᵀ τ V, its diagonal and
    top-left r × r block zeroed, U P Vᵀ back; r = the first index whose cumulative share of Σσ exceeds α."""
    u, s, vt = np.linalg.svd(update, full_matrices=True)
    share = np.cumsum(s) / s.sum()
    r = int(np.argmax(share > alpha))
    p = u.T @ tau @ vt.T
    np.fill_diagonal(p, 0.0)
    p[:r, :r] = 0.0
    return u @ p @ vt


@pytest.mark.parametrize("shape", [(5, 4), (3, 6)])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8])  # r = 0, 1, 2 on the spectrum 4, 3, 2, 1
def test_the_projection_is_the_papers_rule_and_orthogonal_to_the_update(shape, alpha):
    update = matrix(1, shape, spectrum=[4.0, 3.0, 2.0, 1.0][: min(shape)])  # full rank: the reference's rule exactly
    tau = matrix(2, shape)
    projected = project_out(update, tau, alpha)
    expected = hand_projection(update.double().numpy(), tau.double().numpy(), alpha)
    np.testing.assert_allclose(projected.double().numpy(), expected, atol=1e-5)
    assert abs(float((projected * update).sum())) < 1e-4  # ⟨P(τ), S⟩ = 0
    u, s, vh = np.linalg.svd(update.double().numpy())
    r = int(np.argmax(np.cumsum(s) / s.sum() > alpha))
    coordinates = u.T @ projected.double().numpy() @ vh.T
    np.testing.assert_allclose(np.diag(coordinates), 0.0, atol=1e-5)  # nothing along any u_i v_iᵀ
    np.testing.assert_allclose(coordinates[:r, :r], 0.0, atol=1e-5)  # nothing between the top r directions
    assert np.abs(coordinates).max() > 0.1  # the rest is kept


def test_a_rank_deficient_update_removes_only_its_own_singular_pairs():
    update = matrix(6, (5, 4), spectrum=[3.0, 1.0])  # rank 2: shares 0.75, 1
    tau = matrix(7, (5, 4))
    u, _, vh = torch.linalg.svd(update.double())
    pairs = [(u[:, i], vh[i]) for i in range(2)]
    expected = tau.double() - sum((a @ tau.double() @ b) * torch.outer(a, b) for a, b in pairs)  # r = 0 at α = 0.5
    torch.testing.assert_close(project_out(update, tau, 0.5).double(), expected, atol=1e-5, rtol=1e-5)


def test_a_zero_update_keeps_the_task_vector_whole():
    tau = matrix(5)
    assert torch.equal(project_out(torch.zeros(5, 4), tau, 0.5), tau)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.proj = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)


def hand_merge(base: nn.Module, experts: list[nn.Module], alpha: float) -> dict[str, np.ndarray]:
    """S_1 = τ_1, S_t = S_{t−1} + P(τ_t) for proj.weight, + τ_t for the rest; θ_0 + mean‖τ_k‖ S/‖S‖."""
    theta0 = {k: v.detach().double().numpy() for k, v in base.state_dict().items()}
    taus = [{k: v.detach().double().numpy() - theta0[k] for k, v in e.state_dict().items()} for e in experts]
    total = dict(taus[0])
    for tau in taus[1:]:
        for key, value in tau.items():
            step = hand_projection(total[key], value, alpha) if key == "proj.weight" else value
            total[key] = total[key] + step
    norms = [np.sqrt(sum((t ** 2).sum() for t in tau.values())) for tau in taus]
    scale = np.mean(norms) / np.sqrt(sum((t ** 2).sum() for t in total.values()))
    return {key: theta0[key] + scale * total[key] for key in total}


@pytest.mark.parametrize("count", [1, 2, 3])
def test_the_merge_is_the_rescaled_running_update(count):
    torch.manual_seed(0)
    base = Net()
    experts = [perturbed(base, seed, 0.5) for seed in range(1, count + 1)]
    merged = METHODS.get("sequential_projection")(base, experts, alpha=0.5).state_dict()
    expected = hand_merge(base, experts, 0.5)
    for key, value in expected.items():
        np.testing.assert_allclose(merged[key].double().numpy(), value, atol=1e-5, err_msg=key)
    if count == 1:  # one expert is itself
        for key, value in experts[0].state_dict().items():
            torch.testing.assert_close(merged[key], value)


def test_the_embedding_table_is_summed_not_projected():
    torch.manual_seed(0)
    base = Net()
    experts = [perturbed(base, seed, 0.5) for seed in (1, 2)]
    merged = METHODS.get("sequential_projection")(base, experts).state_dict()
    theta0 = base.state_dict()
    taus = [{k: e.state_dict()[k] - theta0[k] for k in theta0} for e in experts]
    ratio = (merged["embed.weight"] - theta0["embed.weight"]) / (taus[0]["embed.weight"] + taus[1]["embed.weight"])
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio.flatten()[0])))  # one global scale
    proj = merged["proj.weight"] - theta0["proj.weight"]
    assert not torch.allclose(proj / float(ratio.flatten()[0]), taus[0]["proj.weight"] + taus[1]["proj.weight"])


def test_the_experts_are_read_one_at_a_time():
    pretrained = Net()
    reads, live, most = [], {}, [0]

    class Counted(dict):
        """An expert's state dict whose every read is recorded and tracked until it is freed."""

        def __init__(self, name, state):
            super().__init__(state)
            self.name = name

        def __getitem__(self, key):
            tensor = super().__getitem__(key).clone()
            token = len(reads)
            reads.append(self.name)
            live[token] = self.name
            weakref.finalize(tensor, live.pop, token)
            most[0] = max(most[0], len(live))
            return tensor

    names = ["a", "b", "c", "d"]
    experts = {n: Counted(n, perturbed(pretrained, seed).state_dict()) for seed, n in enumerate(names, 1)}
    METHODS.get("sequential_projection")(pretrained, experts)
    keys = len(pretrained.state_dict())
    assert reads == [n for n in names for _ in range(keys)]  # expert by expert, each key once
    assert most[0] <= 2  # a read tensor is gone once the next is read: memory does not grow with K


def test_alpha_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match=r"sequential_projection: alpha must be in \[0, 1\], got 1.5"):
        METHODS.get("sequential_projection")(Net(), [Net()], alpha=1.5)
