"""WUDI's gradient pieces are contracted in the order the shape makes cheap: the same numbers as
the three-operand einsum, without ever building the ``m × m`` product a tall matrix (an untied
LM head, ``m`` = vocabulary) cannot hold."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adamerge.methods.wudi import gram_offset, inverse_square_norms, wudi_gradient


def stack(k: int, m: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(k, m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class LargestTensor(TorchDispatchMode):
    """Records the most elements any aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
        return out


@pytest.mark.parametrize("shape", [(3, 5, 9), (3, 12, 4)], ids=["m<n", "m>n"])
def test_gram_offset_is_the_three_operand_einsum(shape):
    taus = stack(*shape, seed=1)
    anchor = taus.sum(dim=0) + stack(1, *shape[1:], seed=2)[0]
    weighted = inverse_square_norms(taus).view(-1, 1, 1) * taus
    naive = torch.einsum("kin,kjn,kjo->io", anchor.unsqueeze(0) - taus, weighted, taus)
    torch.testing.assert_close(gram_offset(anchor, taus, weighted), naive, rtol=1e-12, atol=1e-12)


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
