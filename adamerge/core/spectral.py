"""Spectral coefficients in the merge: one per singular component of each expert's task matrix.

A ``spectral`` layout (:mod:`adamerge.core.granularities.spectral`, AdaRank: Lee et al., ICLR
2026, arXiv 2503.22178) gives a matrix ``c`` slots: its top components, ``τ_k = Σ_j σ_kj u_kj
v_kjᵀ`` (one SVD per expert, in float32 on the model's device, once at build), and with a
``rank`` one more slot for the rest of ``τ_k``. With ``L = [U_k diag(σ_k)]`` and ``R = [V_kᵀ]``
stacked over the experts (the LoRA factor layout of :mod:`adamerge.core.low_rank`) the merge is

    θ = θ_0 + Σ_k a_k τ_k + (L ⊙ (c − a)[owner]) R

with ``a_k`` the rest's coefficient, or, without a rest, expert ``k``'s initial coefficient of the
matrix (a constant): ``Σ_j c_kj σ_kj u_kj v_kjᵀ + a_k (τ_k − its top-c part)``, the rest being zero
(to rounding) when every component has a slot. The first term is the dense merge every
granularity runs, so at equal initial values the merge is task arithmetic bit for bit; autograd
gives ``∂L/∂c_kj = <∂L/∂θ, σ_kj u_kj v_kjᵀ>`` without forming a dense component. The dense ``τ``
stays (the rest and the anchor read it), so the factors add ``K·c·(m + n)`` numbers per matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from adamerge.core.layouts import CoefficientLayout

PARTS = ("left", "right", "owner", "slot")


def decompose(tau: Tensor, slots: Sequence[int], device: torch.device | str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``[K, m, n]`` task vectors → ``left [m, K·c]`` (``U_k diag(σ_k)`` of each expert's top
    ``c = len(slots)`` components, side by side), ``right [K·c, n]`` (``V_kᵀ``), ``owner [K·c]``
    (the expert of each component) and ``slot [K·c]`` (its coefficient slot). One float32 SVD per
    expert on ``device``; the factors are kept in ``τ``'s dtype."""
    experts, m, n = tau.shape
    count = len(slots)
    lefts, rights = [], []
    for k in range(experts):  # one at a time: CPU LAPACK's batched SVD is several times slower on such stacks
        u, s, vh = torch.linalg.svd(tau[k].to(device=device, dtype=torch.float32), full_matrices=False)
        lefts.append(u[:, :count] * s[:count])
        rights.append(vh[:count])
    left, right = torch.cat(lefts, dim=1), torch.cat(rights, dim=0)
    owner = torch.arange(experts, device=device).repeat_interleave(count)
    slot = torch.tensor(list(slots), dtype=torch.long, device=device).repeat(experts)
    return left.to(tau.dtype), right.to(tau.dtype), owner, slot


class SpectralMatrices:
    """The merged tensors a spectral layout splits into components: their factors (kept in the
    merged model's vector store) and the coefficient column each one's dense term reads."""

    def __init__(self, layout: CoefficientLayout, keys: Sequence[str], vectors: nn.Module, devices: Mapping[str, torch.device]):
        self.count: dict[int, int] = {}  # key index -> components per expert
        self.anchor: dict[int, int] = {}  # key index -> the column of a_k
        self.initial_slots: list[int] = []  # columns past the layout's: an initial value each
        if layout.granularity != "spectral":
            return
        frozen = set(layout.frozen)
        for index, key in enumerate(keys):
            slots = layout.tensor_slots[key]
            if len(slots) < 2 or frozen.issuperset(slots):  # one coefficient, or none that moves: the dense merge alone
                continue
            tau = getattr(vectors, f"t{index}")
            if tau.dim() != 3:
                raise ValueError(f"spectral coefficients give {key!r} {len(slots)} slots, but it is not a matrix {tuple(tau.shape[1:])}")
            self.count[index] = len(slots) if len(slots) >= min(tau.shape[1:]) else len(slots) - 1
            if self.count[index] == len(slots):
                self.anchor[index] = layout.num_slots + len(self.initial_slots)
                self.initial_slots.append(slots[0])
            else:
                self.anchor[index] = slots[-1]  # the rest
            for part, value in zip(PARTS, decompose(tau, slots[: self.count[index]], devices[key])):
                vectors.keep(f"t{index}_svd_{part}", value)

    def dense_slots(self, index: int, slots: tuple[int, ...]) -> tuple[int, ...]:
        """The slots the dense merge of tensor ``index`` reads (row chunks, or its anchor column)."""
        return (self.anchor[index],) if index in self.count else slots

    def columns(self, values: Tensor, initial: Tensor) -> Tensor:
        """``values [K, S]`` with the constant anchors appended (the initial values they copy)."""
        if not self.initial_slots:
            return values
        return torch.cat([values, initial[:, self.initial_slots].to(values)], dim=1)

    def base(self, index: int, base: Tensor, dtype: torch.dtype) -> Tensor:
        """A split tensor's dense merge runs in the coefficients' dtype (or wider): rounded once, at the end."""
        return base.to(torch.promote_types(dtype, base.dtype)) if index in self.count else base

    def add_components(self, merged: Mapping[str, Tensor], keys: Sequence[str], columns: Tensor, vectors: nn.Module,
                       bases: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``dense + (L ⊙ (c − a)[owner]) R`` for every split tensor, cast to its base's dtype."""
        out = {}
        for index in self.count:
            dense = merged[keys[index]]
            left, right, owner, slot = (getattr(vectors, f"t{index}_svd_{part}") for part in PARTS)
            owner, slot = owner.to(columns.device), slot.to(columns.device)
            scale = (columns[owner, slot] - columns[owner, self.anchor[index]]).to(dense)
            left = left.to(device=dense.device, dtype=dense.dtype, non_blocking=True)
            right = right.to(device=dense.device, dtype=dense.dtype, non_blocking=True)
            out[keys[index]] = torch.addmm(dense, left * scale, right).to(bases[keys[index]].dtype)
        return out
