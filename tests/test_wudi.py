"""WUDI against its definition (float64 references, never the package's helpers): the paper's
objective, its gradient (central differences; the optimiser's closed form), the loss it lowers
from the task-arithmetic start, the single-task optimum; on a module only the linear weights move.
The gradient's pieces are contracted in the order the shape makes cheap: the same numbers as the
three-operand einsum, without ever building the ``m × m`` product a tall matrix (an untied LM
head, ``m`` = vocabulary) cannot hold."""

from __future__ import annotations

import pytest
import torch

import adamerge as am
from adamerge.methods import METHODS, wudi_delta, wudi_loss
from adamerge.methods.wudi import gram_offset, inverse_square_norms, wudi_gradient
from fixtures.allocations import LargestTensor


def stack(k: int, m: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(k, m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("shape", [(3, 5, 9), (3, 12, 4)], ids=["m<n", "m>n"])
def test_gram_offset_is_the_three_operand_einsum(shape):
    taus = stack(*shape, seed=1)
    anchor = taus.sum(dim=0) + stack(1, *shape[1:], seed=2)[0]
    weights = inverse_square_norms(taus)
    torch.testing.assert_close(weights, 1 / taus.square().sum(dim=(1, 2)), rtol=1e-12, atol=0)
    naive = torch.einsum("kin,kjn,kjo->io", anchor.unsqueeze(0) - taus, weights.view(-1, 1, 1) * taus, taus)
    torch.testing.assert_close(gram_offset(anchor, taus, weights), naive, rtol=1e-12, atol=1e-12)


def test_a_tall_matrix_never_builds_an_m_by_m_intermediate():
    taus = stack(3, 64, 8, seed=3).float()  # m·m = 4096 and K·m·m = 12288 elements, the stack 1536
    recorder = LargestTensor()
    with recorder:
        gradient = wudi_gradient(taus)
        gradient(taus.sum(dim=0) * 0.5)
    assert recorder.numel <= taus.numel()
    # the recorder sees the old contraction's intermediate
    with recorder:
        torch.einsum("kin,kjn,kjo->io", taus, taus, taus)
    assert recorder.numel >= 64 * 64


def test_the_solve_never_copies_the_stack_of_task_matrices():
    taus = stack(4, 64, 8, seed=4).float()  # one task's matrix 512 elements, the stack 2048
    recorder = LargestTensor()
    with recorder:
        wudi_delta(taus, iterations=2, device="cpu")
    assert recorder.numel == 64 * 8  # m × n: the start, the merged matrix, Adam's moments; never [K, m, n]
    # the recorder sees a copy of the stack (the weighted stack the Gram was once built from)
    with recorder:
        inverse_square_norms(taus).view(-1, 1, 1) * taus
    assert recorder.numel == taus.numel()


def test_wudi_loss_is_the_papers_objective(ref):
    taus, merged = ref.randn(3, 4, 5, seed=18).double(), ref.randn(4, 5, seed=19).double()
    expected = sum(
        torch.linalg.matrix_norm((merged - tau) @ tau.T) ** 2 / torch.linalg.matrix_norm(tau) ** 2 for tau in taus
    )
    torch.testing.assert_close(wudi_loss(merged, taus), expected)


def test_wudi_gradient_matches_central_differences_in_float64(ref):
    taus = ref.randn(3, 4, 5, seed=9).double()
    merged = ref.randn(4, 5, seed=10).double().requires_grad_()
    wudi_loss(merged, taus).backward()
    numeric = torch.zeros(4, 5, dtype=torch.float64)
    h = 1e-6
    with torch.no_grad():
        for i in range(4):
            for j in range(5):
                step = torch.zeros(4, 5, dtype=torch.float64)
                step[i, j] = h
                numeric[i, j] = (wudi_loss(merged + step, taus) - wudi_loss(merged - step, taus)) / (2 * h)
    torch.testing.assert_close(merged.grad, numeric, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(3, 4, 5), (1, 2, 9)], ids=["gram", "per-task"])
def test_wudi_optimiser_gradient_is_the_loss_gradient(ref, shape):
    taus = ref.randn(*shape, seed=11).double()
    merged = ref.randn(*shape[1:], seed=12).double().requires_grad_()
    wudi_loss(merged, taus).backward()
    torch.testing.assert_close(wudi_gradient(taus)(merged.detach()), merged.grad, rtol=1e-10, atol=1e-10)


def test_wudi_lowers_its_loss_below_the_task_arithmetic_start(ref):
    taus = ref.randn(4, 6, 8, seed=13) * 1e-3  # task-vector-sized entries: the default lr moves them
    start = wudi_loss(taus.sum(0), taus)
    merged = wudi_delta(taus)  # the paper's 300 Adam steps at lr 1e-5
    assert merged.shape == (6, 8) and merged.dtype == torch.float32 and merged.device == taus.device
    assert wudi_loss(merged, taus) < 0.9 * start
    longer = wudi_delta(taus, iterations=600)
    assert wudi_loss(longer, taus) < wudi_loss(merged, taus)
    torch.testing.assert_close(wudi_delta(taus, iterations=0), taus.sum(0))


def test_wudi_single_task_optimum_is_the_task_vector_on_its_row_space(ref):
    tau = ref.randn(1, 3, 6, seed=14)
    # anything orthogonal to τ_1's rows is free: τ_1 + Z with Z τ_1ᵀ = 0 has loss 0 ...
    rows = ref.column_projector(tau[0].T).float()
    free = ref.randn(3, 6, seed=15) @ (torch.eye(6) - rows)
    assert wudi_loss(tau[0] + free, tau).item() == pytest.approx(0.0, abs=1e-8)
    # ... while a change inside the row space costs
    assert wudi_loss(tau[0] + ref.randn(3, 6, seed=16) @ rows, tau).item() > 1e-2
    # the optimiser starts at Σ τ = τ_1, a minimum (zero gradient), and stays there
    torch.testing.assert_close(wudi_delta(tau, lr=1e-2), tau[0])


def test_wudi_on_a_module_optimises_linear_weights_only(ref, tiny_encoder_zoo):
    model, experts = tiny_encoder_zoo
    before = model.state_dict()
    taus = {k: torch.stack([e.state_dict()[k] - before[k] for e in experts]) for k in before}
    merged = am.methods.wudi(model, experts, iterations=20, lr=1e-3)
    assert METHODS.get("wudi") is am.methods.wudi
    state = merged.state_dict()
    for key in ("lin1.weight", "lin2.weight"):
        ref.close(state[key], before[key] + wudi_delta(taus[key], iterations=20, lr=1e-3), atol=1e-6)
        assert not torch.allclose(state[key], before[key] + taus[key].sum(0), atol=1e-4)  # it moved
    others = {"lin1.bias", "norm.weight", "norm.bias", "lin2.bias", "embed.weight"}
    for key in others:  # the paper's code leaves them pretrained
        assert torch.equal(state[key], before[key])
    mean = am.methods.wudi(model, experts, iterations=20, lr=1e-3, others="mean", scaling=0.5).state_dict()
    for key in others:
        ref.close(mean[key], before[key] + 0.5 * taus[key].mean(0), atol=1e-6)
    ref.close(mean["lin1.weight"], before["lin1.weight"] + 0.5 * wudi_delta(taus["lin1.weight"], 20, 1e-3), atol=1e-6)
    as_dict = am.methods.wudi(model.state_dict(), [e.state_dict() for e in experts], iterations=20, lr=1e-3)
    for key, value in state.items():  # "embed" in the name: an embedding table there too
        ref.close(as_dict[key], value, atol=1e-6)
    with pytest.raises(ValueError, match="others"):
        am.methods.wudi(model, experts, others="sum")
