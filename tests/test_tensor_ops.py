"""The pure tensor functions behind TIES and DARE, on hand-computed tensors: trimming to the top
``ceil(density·n)`` entries per expert, sign election, the disjoint mean, DARE's seeded drop and rescale."""

from __future__ import annotations

import pytest
import torch

from adamerge.core import tensor_ops


def test_trim_per_tensor_keeps_exactly_ceil_density_n():
    x = torch.tensor([[1.0, -4.0, 3.0, 0.5, 2.0], [-2.0, 0.1, 0.3, 5.0, -0.2]])
    # density 0.5 of 5 entries: ceil(2.5) = 3 per expert
    assert torch.equal(
        tensor_ops.trim(x, 0.5), torch.tensor([[0.0, -4.0, 3.0, 0.0, 2.0], [-2.0, 0.0, 0.3, 5.0, 0.0]])
    )
    # density 0.3: ceil(1.5) = 2
    assert torch.equal(
        tensor_ops.trim(x, 0.3), torch.tensor([[0.0, -4.0, 3.0, 0.0, 0.0], [-2.0, 0.0, 0.0, 5.0, 0.0]])
    )
    # a tiny density still keeps one entry; density 1 keeps all
    assert torch.equal(tensor_ops.trim(x, 0.01), torch.tensor([[0.0, -4.0, 0, 0, 0], [0, 0, 0, 5.0, 0]]))
    assert torch.equal(tensor_ops.trim(x, 1.0), x)
    assert tensor_ops.keep_count(10, 0.25) == 3 and tensor_ops.keep_count(7, 1.0) == 7
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        tensor_ops.trim(x, 0.0)
    # on a [K, rows, cols] tensor the count is over all entries of each expert
    big = torch.randn(3, 4, 5)
    kept = (tensor_ops.trim(big, 0.2) != 0).flatten(1).sum(dim=1)
    assert kept.tolist() == [4, 4, 4]


def test_sign_election_sum_count_and_ties():
    x = torch.tensor([[1.0, 1.0, -5.0, 2.0, 0.0], [1.0, -3.0, 0.0, -2.0, 0.0], [-4.0, 1.0, 0.0, 0.0, 0.0]])
    # sums: -2, -1, -5, 0 (tie), 0 (tie)
    assert tensor_ops.elect_sign(x, "sum").tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0]
    # votes: +1, +1, -1, 0 (tie), 0 (tie)
    assert tensor_ops.elect_sign(x, "count").tolist() == [1.0, 1.0, -1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown sign election method 'vote'"):
        tensor_ops.elect_sign(x, "vote")


def test_disjoint_mean():
    x = torch.tensor([[1.0, 1.0, -5.0, 2.0, 0.0], [1.0, -3.0, 0.0, -2.0, 0.0], [-4.0, 1.0, 0.0, 0.0, 0.0]])
    sign = torch.tensor([-1.0, 1.0, -1.0, 1.0, 1.0])
    # col 0: only -4 agrees; col 1: 1 and 1 agree -> 1; col 2: -5 (zeros never count);
    # col 3: only 2 agrees; col 4: nobody -> 0
    assert tensor_ops.disjoint_mean(x, sign).tolist() == [-4.0, 1.0, -5.0, 2.0, 0.0]
    assert tensor_ops.agrees(x, sign)[:, 1].tolist() == [True, False, True]


def test_dare_reproducible_rate_and_rescale():
    x = torch.randn(2, 200, 250) + 3.0  # no zeros
    first = tensor_ops.dare(x, 0.3, torch.Generator().manual_seed(7))
    again = tensor_ops.dare(x, 0.3, torch.Generator().manual_seed(7))
    other = tensor_ops.dare(x, 0.3, torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    kept = first != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(first[kept], x[kept] / 0.3)
    plain = tensor_ops.dare(x, 0.3, torch.Generator().manual_seed(7), rescale=False)
    assert torch.equal(plain != 0, kept)
    assert torch.equal(plain[kept], x[kept])
    assert torch.equal(tensor_ops.dare(x, 1.0, torch.Generator()), x)
    with pytest.raises(ValueError, match="density"):
        tensor_ops.dare(x, 1.5, torch.Generator())


def test_magnitude_threshold_and_trim_below_keep_one_threshold_per_expert():
    values = torch.tensor([0.5, -4.0, 3.0, 1.0, -2.0])
    assert float(tensor_ops.magnitude_threshold(values, 0.4)) == 3.0  # the top ceil(2.0) = 2: |-4|, |3|
    assert float(tensor_ops.magnitude_threshold(values, 0.5)) == 2.0  # the top ceil(2.5) = 3
    x = torch.tensor([[1.0, -2.0, 3.0], [0.5, -0.25, 0.1]])
    trimmed = tensor_ops.trim_below(x, torch.tensor([2.0, 0.2]))
    assert torch.equal(trimmed, torch.tensor([[0.0, -2.0, 3.0], [0.5, -0.25, 0.0]]))  # |entry| >= its expert's threshold
