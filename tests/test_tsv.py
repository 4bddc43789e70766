"""TSV-M against its definition, on small random tensors (float64 references computed
independently, never with the package's helpers): each task's top ⌊r/K⌋ components, whitened to
the nearest orthonormal vectors, recombined; the authors' zero-padded layout; learned coefficients
on TSV task vectors start at TSV-M."""

from __future__ import annotations

import pytest
import torch

import adamerge as am
from adamerge.methods import METHODS, tsv_components, tsv_delta
from adamerge.methods.svd import orthogonalize
from adamerge.methods.tsv import tsv_split, tsv_task_vectors
from fixtures.allocations import LargestTensor

# ---------------------------------------------------------------------------- TSV-M


def test_tsv_keeps_the_top_floor_r_over_k_components_of_each_task(ref):
    taus = ref.randn(3, 9, 7, seed=3)  # r = 7, K = 3: ⌊7/3⌋ = 2 per task
    u, s, v = tsv_components(taus)
    assert u.shape == (9, 6) and s.shape == (6,) and v.shape == (7, 6)
    for k in range(3):
        block = slice(2 * k, 2 * k + 2)
        ref.close((u[:, block] * s[block]) @ v[:, block].T, ref.truncate(taus[k], 2))


def test_tsv_decomposes_one_task_matrix_at_a_time():
    taus = torch.randn(4, 64, 8, generator=torch.Generator().manual_seed(5))  # one task's matrix 512 elements
    recorder = LargestTensor()
    with recorder:
        tsv_delta(taus)
    assert recorder.numel == 64 * 8  # one task's U (or the merged matrix), never the K tasks' U at once
    with recorder:  # the recorder sees a batched SVD's U
        torch.linalg.svd(taus, full_matrices=False)
    assert recorder.numel == taus.numel()


def test_tsv_whitening_is_the_nearest_orthonormal_matrix(ref):
    taus = ref.randn(3, 9, 7, seed=4)
    u, s, v = tsv_components(taus)
    u_orth, v_orth = orthogonalize(u), orthogonalize(v)
    ref.close(u_orth.T @ u_orth, torch.eye(6))
    ref.close(v_orth.T @ v_orth, torch.eye(6))
    # the polar factor U (UᵀU)^{-1/2}: the nearest orthonormal columns, closer than QR's
    ref.close(u_orth, u.double() @ ref.inverse_sqrt(u.T @ u))
    ref.close(v_orth, v.double() @ ref.inverse_sqrt(v.T @ v))
    q, _ = torch.linalg.qr(u)
    assert torch.linalg.norm(u_orth - u) < torch.linalg.norm(q - u)
    # the merge recombines the whitened vectors with the kept singular values, times α
    expected = 0.8 * (u.double() @ ref.inverse_sqrt(u.T @ u) * s.double()) @ (v.double() @ ref.inverse_sqrt(v.T @ v)).T
    ref.close(tsv_delta(taus, alpha=0.8), expected)


def test_tsv_matches_the_authors_zero_padded_layout(ref):
    # the authors place task k's ⌊r/K⌋ components at columns k⌊r/K⌋… of r-wide zero matrices
    # (here r = 7, K = 3: one zero column), then take the polar factors of those
    taus = ref.randn(3, 8, 7, seed=5)
    r, num_tasks = 7, 3
    keep = r // num_tasks
    wide_u, wide_s, wide_v = (torch.zeros(*shape, dtype=torch.float64) for shape in [(8, r), (r,), (7, r)])
    for k in range(num_tasks):
        u, s, v = ref.svd64(taus[k])
        wide_u[:, k * keep:(k + 1) * keep] = u[:, :keep]
        wide_s[k * keep:(k + 1) * keep] = s[:keep]
        wide_v[:, k * keep:(k + 1) * keep] = v[:, :keep]
    pu, _, qu = ref.svd64(wide_u)
    pv, _, qv = ref.svd64(wide_v)
    ref.close(tsv_delta(taus), (pu @ qu.T * wide_s) @ (pv @ qv.T).T)


@pytest.mark.parametrize("ranks", [(8, 4), (5, 4, 3)], ids=["K=2", "K=3"])
def test_tsv_of_mutually_orthogonal_tasks_is_the_sum_of_their_truncations(ref, ranks):
    # 12 × 12 task matrices living in mutually orthogonal column and row blocks: the stacked
    # singular vectors are already orthonormal, so whitening changes nothing and TSV-M is the
    # sum of the rank-⌊12/K⌋ truncations (tasks of lower rank are kept whole: their
    # zero singular values carry arbitrary vectors, which must not enter the whitening)
    left, right = ref.orthonormal(12, 12, seed=6), ref.orthonormal(12, 12, seed=7)
    keep = 12 // len(ranks)
    taus, expected, start = [], torch.zeros(12, 12, dtype=torch.float64), 0
    for k, rank in enumerate(ranks):
        block = slice(start, start + rank)
        sigma = torch.linspace(3.0, 1.0, rank, dtype=torch.float64) * (k + 1)
        tau = (left[:, block] * sigma) @ right[:, block].T
        taus.append(tau)
        expected += (left[:, block][:, :keep] * sigma[:keep]) @ right[:, block][:, :keep].T
        start += rank
    stacked = torch.stack(taus).float()
    ref.close(tsv_delta(stacked), expected)
    assert not torch.allclose(expected.float(), stacked.sum(0), atol=1e-3)  # the truncation bites


def test_tsv_split_sums_to_tsv_m_and_splits_orthogonal_tasks_into_their_truncations(ref):
    taus = ref.randn(3, 8, 6, seed=11)
    ref.close(tsv_split(taus, alpha=0.7).sum(0), tsv_delta(taus, alpha=0.7))
    # mutually orthogonal tasks (as above): whitening changes nothing, each part is its task's truncation
    left, right = ref.orthonormal(12, 12, seed=6), ref.orthonormal(12, 12, seed=7)
    sigma = torch.linspace(3.0, 1.0, 6, dtype=torch.float64)
    blocks = [slice(0, 6), slice(6, 12)]
    stacked = torch.stack([(left[:, b] * sigma) @ right[:, b].T for b in blocks]).float()
    parts = tsv_split(stacked)
    for k, b in enumerate(blocks):
        ref.close(parts[k], (left[:, b][:, :6] * sigma) @ right[:, b][:, :6].T)


def test_learned_coefficients_on_tsv_task_vectors_start_at_tsv_m(ref):
    """Every coefficient 1 over :func:`tsv_task_vectors` is the TSV-M method's merge, the bias
    (not a matrix) included: a learned merge on them starts where TSV-M ends."""
    base, experts = ref.mlp_zoo()
    merged = am.MergedModel(base, tsv_task_vectors(am.TaskVectors.from_models(base, experts), alpha=0.8), "layer", init=1.0)
    reference = METHODS.get("tsv")(base, experts, alpha=0.8).state_dict()
    for key, tensor in merged.merged_parameters().items():
        ref.close(tensor, reference[key], atol=1e-5)


# ---------------------------------------------------------------------------- registered methods
