"""TSV-M, Iso-C, Iso-CTS and WUDI against their definitions, on small random tensors.

Reference values are computed independently here, in float64 (``torch.linalg`` on the
whole matrix, eigen-decompositions, explicit projectors), never with the package helpers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adamerge as am
from adamerge.methods import (
    METHODS,
    embedding_keys,
    iso_c_delta,
    iso_cts_components,
    iso_cts_delta,
    iso_cts_sizes,
    tsv_components,
    tsv_delta,
    wudi_delta,
    wudi_loss,
)
from adamerge.methods.svd import orthogonalize
from adamerge.methods.base import with_start
from adamerge.methods.tsv import tsv_split, tsv_task_vectors
from adamerge.methods.wudi import wudi_gradient

ATOL = 1e-4  # float32 SVDs of matrices with entries ~1


def rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=rng(seed))


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=rng(seed)))
    return q


def svd64(x: torch.Tensor):
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return u, s, vh.T


def truncate(x: torch.Tensor, k: int) -> torch.Tensor:
    u, s, v = svd64(x)
    return (u[:, :k] * s[:k]) @ v[:, :k].T


def column_projector(x: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Orthogonal projector onto the column space of ``x`` (numerical rank by ``tol``)."""
    u, s, _ = svd64(x)
    u = u[:, s > tol * s.max()]
    return u @ u.T


def inverse_sqrt(gram: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(gram.double())
    return (vectors * values.rsqrt()) @ vectors.T


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=atol)


# ---------------------------------------------------------------------------- Iso-C


def test_iso_c_is_alpha_mean_sigma_times_the_polar_factor_of_the_sum():
    taus = randn(3, 7, 5, seed=0)
    delta = taus.double().sum(0)
    u, s, v = svd64(delta)
    merged = iso_c_delta(taus, alpha=0.7)
    # flat spectrum: every singular value is α · mean σ(Σ τ_k)
    close(torch.linalg.svdvals(merged.double()), torch.full((5,), 0.7 * s.mean().item()))
    # same singular subspaces, same pairing: merged = α σ̄ U Vᵀ
    close(merged, 0.7 * s.mean() * u @ v.T)
    close(column_projector(merged), u @ u.T)


def test_iso_c_spreads_the_mean_over_the_nonzero_rank_only():
    # two rank-1 task matrices: Σ τ_k has rank 2 in a 6 × 5 matrix
    a, b = randn(6, 2, seed=1), randn(5, 2, seed=2)
    taus = torch.stack([torch.outer(a[:, 0], b[:, 0]), torch.outer(a[:, 1], b[:, 1])])
    delta = taus.double().sum(0)
    _, s, _ = svd64(delta)
    merged = iso_c_delta(taus, alpha=2.0)
    sigma = torch.linalg.svdvals(merged.double())
    close(sigma[:2], torch.full((2,), 2.0 * s[:2].mean().item()))  # the mean of the 2 non-zero σ
    close(sigma[2:], torch.zeros(3))  # nothing outside the span of Σ τ_k
    close(column_projector(merged), column_projector(delta))  # left subspace
    close(column_projector(merged.T), column_projector(delta.T))  # right subspace


# ---------------------------------------------------------------------------- TSV-M


def test_tsv_keeps_the_top_floor_r_over_k_components_of_each_task():
    taus = randn(3, 9, 7, seed=3)  # r = 7, K = 3: ⌊7/3⌋ = 2 per task
    u, s, v = tsv_components(taus)
    assert u.shape == (9, 6) and s.shape == (6,) and v.shape == (7, 6)
    for k in range(3):
        block = slice(2 * k, 2 * k + 2)
        close((u[:, block] * s[block]) @ v[:, block].T, truncate(taus[k], 2))


def test_tsv_whitening_is_the_nearest_orthonormal_matrix():
    taus = randn(3, 9, 7, seed=4)
    u, s, v = tsv_components(taus)
    u_orth, v_orth = orthogonalize(u), orthogonalize(v)
    close(u_orth.T @ u_orth, torch.eye(6))
    close(v_orth.T @ v_orth, torch.eye(6))
    # the polar factor U (UᵀU)^{-1/2}: the nearest orthonormal columns, closer than QR's
    close(u_orth, u.double() @ inverse_sqrt(u.T @ u))
    close(v_orth, v.double() @ inverse_sqrt(v.T @ v))
    q, _ = torch.linalg.qr(u)
    assert torch.linalg.norm(u_orth - u) < torch.linalg.norm(q - u)
    # the merge recombines the whitened vectors with the kept singular values, times α
    expected = 0.8 * (u.double() @ inverse_sqrt(u.T @ u) * s.double()) @ (v.double() @ inverse_sqrt(v.T @ v)).T
    close(tsv_delta(taus, alpha=0.8), expected)


def test_tsv_matches_the_authors_zero_padded_layout():
    # the authors place task k's ⌊r/K⌋ components at columns k⌊r/K⌋… of r-wide zero matrices
    # (here r = 7, K = 3: one zero column), then take the polar factors of those
    taus = randn(3, 8, 7, seed=5)
    r, num_tasks = 7, 3
    keep = r // num_tasks
    wide_u, wide_s, wide_v = (torch.zeros(*shape, dtype=torch.float64) for shape in [(8, r), (r,), (7, r)])
    for k in range(num_tasks):
        u, s, v = svd64(taus[k])
        wide_u[:, k * keep:(k + 1) * keep] = u[:, :keep]
        wide_s[k * keep:(k + 1) * keep] = s[:keep]
        wide_v[:, k * keep:(k + 1) * keep] = v[:, :keep]
    pu, _, qu = svd64(wide_u)
    pv, _, qv = svd64(wide_v)
    close(tsv_delta(taus), (pu @ qu.T * wide_s) @ (pv @ qv.T).T)


@pytest.mark.parametrize("ranks", [(8, 4), (5, 4, 3)], ids=["K=2", "K=3"])
def test_tsv_of_mutually_orthogonal_tasks_is_the_sum_of_their_truncations(ranks):
    # 12 × 12 task matrices living in mutually orthogonal column and row blocks: the stacked
    # singular vectors are already orthonormal, so whitening changes nothing and TSV-M is the
    # sum of the rank-⌊12/K⌋ truncations (tasks of lower rank are kept whole: their
    # zero singular values carry arbitrary vectors, which must not enter the whitening)
    left, right = orthonormal(12, 12, seed=6), orthonormal(12, 12, seed=7)
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
    close(tsv_delta(stacked), expected)
    assert not torch.allclose(expected.float(), stacked.sum(0), atol=1e-3)  # the truncation bites


def test_tsv_split_sums_to_tsv_m_and_splits_orthogonal_tasks_into_their_truncations():
    taus = randn(3, 8, 6, seed=11)
    close(tsv_split(taus, alpha=0.7).sum(0), tsv_delta(taus, alpha=0.7))
    # mutually orthogonal tasks (as above): whitening changes nothing, each part is its task's truncation
    left, right = orthonormal(12, 12, seed=6), orthonormal(12, 12, seed=7)
    sigma = torch.linspace(3.0, 1.0, 6, dtype=torch.float64)
    blocks = [slice(0, 6), slice(6, 12)]
    stacked = torch.stack([(left[:, b] * sigma) @ right[:, b].T for b in blocks]).float()
    parts = tsv_split(stacked)
    for k, b in enumerate(blocks):
        close(parts[k], (left[:, b][:, :6] * sigma) @ right[:, b][:, :6].T)


def small_zoo():
    """A two-layer MLP and three seeded perturbations of it."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    experts = []
    for seed in range(3):
        expert = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
        expert.load_state_dict({k: v + 0.1 * randn(*v.shape, seed=seed) for k, v in base.state_dict().items()})
        experts.append(expert)
    return base, experts


def test_learned_coefficients_on_tsv_task_vectors_start_at_tsv_m():
    """Every coefficient 1 over :func:`tsv_task_vectors` is the TSV-M method's merge, the bias
    (not a matrix) included: a learned merge on them starts where TSV-M ends."""
    base, experts = small_zoo()
    merged = am.MergedModel(base, tsv_task_vectors(am.TaskVectors.from_models(base, experts), alpha=0.8), "layer", init=1.0)
    reference = METHODS.get("tsv")(base, experts, alpha=0.8).state_dict()
    for key, tensor in merged.merged_parameters().items():
        close(tensor, reference[key], atol=1e-5)


def test_a_start_vector_at_one_is_its_merge_and_the_experts_rows_are_their_task_vectors():
    """``with_start``: coefficient 1 on the data-free merge's update and 0 on the experts is that
    merge exactly (here TIES, which no per-expert weighting of raw τ reproduces)."""
    base, experts = small_zoo()
    plain = am.TaskVectors.from_models(base, experts)
    tv = with_start(plain, base, experts, "ties", {"density": 0.5})
    assert tv.expert_names == ("start", "expert_0", "expert_1", "expert_2")
    init = {"start": 1.0, "expert_0": 0.0, "expert_1": 0.0, "expert_2": 0.0}
    merged = am.MergedModel(base, tv, "layer", init=init)
    reference = METHODS.get("ties")(base, experts, density=0.5).state_dict()
    for key, tensor in merged.merged_parameters().items():
        close(tensor, reference[key], atol=1e-6)
        assert torch.equal(tv[key][1:], plain[key])
    with pytest.raises(ValueError, match="an expert is named 'start'"):
        with_start(am.TaskVectors.from_models(base, {"start": experts[0]}), base, {"start": experts[0]}, "ties", {})


# ---------------------------------------------------------------------------- Iso-CTS


def test_iso_cts_sizes():
    assert iso_cts_sizes(10, 2, 0.8) == (8, 1)
    assert iso_cts_sizes(10, 3, 0.8) == (7, 1)  # ⌊8⌋ = 8, the other 2 rounded to 3 = 3 × 1
    assert iso_cts_sizes(10, 1, 0.8) == (8, 2)
    assert iso_cts_sizes(384, 6, 0.8) == (306, 13)  # MiniLM: 307 → 306, 13 per task
    assert iso_cts_sizes(4, 8, 0.8) == (4, 0)  # more tasks than room: common space only
    with pytest.raises(ValueError, match="common_fraction"):
        iso_cts_sizes(10, 2, 1.5)


def test_iso_cts_common_and_task_specific_subspaces_and_flat_spectrum():
    taus = randn(3, 12, 10, seed=8)  # r = 10, K = 3: k = 7 common, 1 per task
    u, s, v, common = iso_cts_components(taus)
    assert common == 7 and u.shape == (12, 10) and v.shape == (10, 10)
    delta = taus.double().sum(0)
    ud, sd, _ = svd64(delta)
    top = ud[:, :7]
    # the common part spans the top-7 left singular subspace of Σ τ_k ...
    close(u[:, :7] @ u[:, :7].T, top @ top.T)
    # ... each task's direction is the top left singular vector of τ_k off that subspace
    off = torch.eye(12, dtype=torch.float64) - top @ top.T
    expected_s = [sd[:7]]
    for k in range(3):
        uk, sk, _ = svd64(off @ taus[k].double())
        assert abs(float(uk[:, 0] @ u[:, 7 + k].double())) == pytest.approx(1.0, abs=1e-4)
        expected_s.append(sk[:1])
        close(top.T @ u[:, 7 + k].double(), torch.zeros(7))
    # orthonormal left vectors after orthogonalisation; the common block is left as it is
    u_orth = orthogonalize(u)
    close(u_orth.T @ u_orth, torch.eye(10))
    close(u_orth[:, :7], u[:, :7])
    # flat spectrum: α times the mean of all the stacked singular values
    sigma_bar = torch.cat(expected_s).mean()
    merged = iso_cts_delta(taus, alpha=0.5)
    close(torch.linalg.svdvals(merged.double()), torch.full((10,), 0.5 * sigma_bar.item()))
    close(column_projector(merged) @ top, top)  # the merged update contains the common subspace


# ---------------------------------------------------------------------------- WUDI


def test_wudi_loss_is_the_papers_objective():
    taus, merged = randn(3, 4, 5, seed=18).double(), randn(4, 5, seed=19).double()
    expected = sum(
        torch.linalg.matrix_norm((merged - tau) @ tau.T) ** 2 / torch.linalg.matrix_norm(tau) ** 2 for tau in taus
    )
    torch.testing.assert_close(wudi_loss(merged, taus), expected)


def test_wudi_gradient_matches_central_differences_in_float64():
    taus = randn(3, 4, 5, seed=9).double()
    merged = randn(4, 5, seed=10).double().requires_grad_()
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
def test_wudi_optimiser_gradient_is_the_loss_gradient(shape):
    taus = randn(*shape, seed=11).double()
    merged = randn(*shape[1:], seed=12).double().requires_grad_()
    wudi_loss(merged, taus).backward()
    torch.testing.assert_close(wudi_gradient(taus)(merged.detach()), merged.grad, rtol=1e-10, atol=1e-10)


def test_wudi_lowers_its_loss_below_the_task_arithmetic_start():
    taus = randn(4, 6, 8, seed=13) * 1e-3  # task-vector-sized entries: the default lr moves them
    start = wudi_loss(taus.sum(0), taus)
    merged = wudi_delta(taus)  # the paper's 300 Adam steps at lr 1e-5
    assert merged.shape == (6, 8) and merged.dtype == torch.float32 and merged.device == taus.device
    assert wudi_loss(merged, taus) < 0.9 * start
    longer = wudi_delta(taus, iterations=600)
    assert wudi_loss(longer, taus) < wudi_loss(merged, taus)
    torch.testing.assert_close(wudi_delta(taus, iterations=0), taus.sum(0))


def test_wudi_single_task_optimum_is_the_task_vector_on_its_row_space():
    tau = randn(1, 3, 6, seed=14)
    # anything orthogonal to τ_1's rows is free: τ_1 + Z with Z τ_1ᵀ = 0 has loss 0 ...
    rows = column_projector(tau[0].T).float()
    free = randn(3, 6, seed=15) @ (torch.eye(6) - rows)
    assert wudi_loss(tau[0] + free, tau).item() == pytest.approx(0.0, abs=1e-8)
    # ... while a change inside the row space costs
    assert wudi_loss(tau[0] + randn(3, 6, seed=16) @ rows, tau).item() > 1e-2
    # the optimiser starts at Σ τ = τ_1, a minimum (zero gradient), and stays there
    torch.testing.assert_close(wudi_delta(tau, lr=1e-2), tau[0])


# ---------------------------------------------------------------------------- registered methods


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.lin1 = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.lin2 = nn.Linear(5, 3)

    def forward(self, ids):
        return self.lin2(self.norm(torch.tanh(self.lin1(self.embed(ids)))))


def tiny_zoo(num_experts: int = 3):
    torch.manual_seed(17)
    model = Tiny()
    experts = []
    for _ in range(num_experts):
        expert = Tiny()
        expert.load_state_dict(model.state_dict())
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.1 * torch.randn_like(p))
        experts.append(expert)
    return model, experts


def stacks(model, experts):
    base = model.state_dict()
    return {k: torch.stack([e.state_dict()[k] - base[k] for e in experts]) for k in base}


MATRIX = {"embed.weight", "lin1.weight", "lin2.weight"}
OTHER = {"lin1.bias", "norm.weight", "norm.bias", "lin2.bias"}
SVD_METHODS = {
    "tsv": (dict(alpha=0.5), lambda t: tsv_delta(t, alpha=0.5)),
    "iso_c": (dict(alpha=0.5), lambda t: iso_c_delta(t, alpha=0.5)),
    "iso_cts": (dict(alpha=0.5, common_fraction=0.6), lambda t: iso_cts_delta(t, alpha=0.5, common_fraction=0.6)),
}


@pytest.mark.parametrize("name", sorted(SVD_METHODS))
def test_svd_methods_on_a_module_and_a_state_dict(name):
    model, experts = tiny_zoo()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args, delta_of = SVD_METHODS[name]
    method = METHODS.get(name)
    assert method is getattr(am.methods, name)
    merged = method(model, experts, **args)
    assert isinstance(merged, Tiny) and merged is not model
    state, taus = merged.state_dict(), stacks(model, experts)
    for key in MATRIX:  # every 2-D tensor, the embedding table included, is merged as a matrix
        close(state[key], before[key] + delta_of(taus[key]), atol=1e-5)
    for key in OTHER:  # every other tensor: α × mean_k τ_k
        close(state[key], before[key] + 0.5 * taus[key].mean(0), atol=1e-6)
    for key, value in model.state_dict().items():  # the input model is untouched
        assert torch.equal(value, before[key])
    as_dict = method(model.state_dict(), [e.state_dict() for e in experts], **args)
    assert isinstance(as_dict, dict)
    for key, value in state.items():
        close(as_dict[key], value, atol=1e-6)
    with torch.no_grad():
        merged(torch.tensor([[0, 3, 10]]))


def test_wudi_on_a_module_optimises_linear_weights_only():
    model, experts = tiny_zoo()
    before = model.state_dict()
    taus = stacks(model, experts)
    merged = am.methods.wudi(model, experts, iterations=20, lr=1e-3)
    assert METHODS.get("wudi") is am.methods.wudi
    state = merged.state_dict()
    for key in ("lin1.weight", "lin2.weight"):
        close(state[key], before[key] + wudi_delta(taus[key], iterations=20, lr=1e-3), atol=1e-6)
        assert not torch.allclose(state[key], before[key] + taus[key].sum(0), atol=1e-4)  # it moved
    for key in OTHER | {"embed.weight"}:  # the paper's code leaves them pretrained
        assert torch.equal(state[key], before[key])
    mean = am.methods.wudi(model, experts, iterations=20, lr=1e-3, others="mean", scaling=0.5).state_dict()
    for key in OTHER | {"embed.weight"}:
        close(mean[key], before[key] + 0.5 * taus[key].mean(0), atol=1e-6)
    close(mean["lin1.weight"], before["lin1.weight"] + 0.5 * wudi_delta(taus["lin1.weight"], 20, 1e-3), atol=1e-6)
    as_dict = am.methods.wudi(model.state_dict(), [e.state_dict() for e in experts], iterations=20, lr=1e-3)
    for key, value in state.items():  # "embed" in the name: an embedding table there too
        close(as_dict[key], value, atol=1e-6)
    with pytest.raises(ValueError, match="others"):
        am.methods.wudi(model, experts, others="sum")


def test_embedding_keys_by_module_type_and_tied_alias():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 9, bias=False)  # registered first: canonical name of the tied weight
            self.table = nn.Embedding(9, 4)
            self.table.weight = self.head.weight

    model = Tied()
    keys = [n for n, _ in model.named_parameters()]
    assert keys == ["head.weight"]
    assert embedding_keys(model, keys) == {"head.weight"}
    tables = ["bert.embeddings.word_embeddings.weight", "model.embed_tokens.weight", "transformer.wte.weight"]
    names = tables + ["encoder.layer.0.attention.self.query.weight", "lm_head.weight"]
    assert embedding_keys(model.state_dict(), names) == set(tables)


def test_svd_falls_back_to_float64_where_float32_does_not_converge(monkeypatch):
    """LAPACK's float32 SVD fails to converge on some real task matrices (Iso-CTS on SmolLM2);
    the SVD helpers then redo it in float64 and return the same factorisation in float32."""
    from adamerge.methods import svd as svd_module

    real_svd = torch.linalg.svd

    def float32_fails(x, full_matrices=True):
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(x, full_matrices=full_matrices)

    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(torch.linalg, "svd", float32_fails)
    u, s, v = svd_module.top_components(x)
    polar = orthogonalize(x)
    assert u.dtype == s.dtype == v.dtype == polar.dtype == torch.float32
    torch.testing.assert_close(svd_module.recombine(u, s, v), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(polar.T @ polar, torch.eye(4), atol=1e-5, rtol=0)
