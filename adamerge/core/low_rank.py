"""K task vectors of one matrix kept as low-rank factors, as LoRA experts give them.

A LoRA expert changes an ``[m, n]`` matrix by ``τ_k = L_k R_k`` (``L_k: [m, r_k]``,
``R_k: [r_k, n]``, Hu et al. 2021). Stacking every expert's factors side by side,
``L = [L_1 … L_K]`` and ``R = [R_1; …; R_K]``, the merge of one row ``i`` is

    θ_i = θ_0,i + Σ_k c_k(i) τ_k,i = θ_0,i + (L_i ⊙ c(i)[owner]) R

where ``owner[j]`` is the expert of rank-one term ``j``: one ``[m, Σr_k] × [Σr_k, n]`` product,
so the K task vectors take ``Σ r_k (m + n)`` numbers instead of ``K m n``, and autograd's
gradient ``∂L/∂c_k(i) = Σ_{j: owner j = k} ((∂L/∂θ) Rᵀ)_ij L_ij`` never forms a dense ``τ_k``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class LowRankStack:
    """``τ_k = left[:, owner == k] @ right[owner == k]`` for k = 0..K-1 (zero where an expert has no term)."""

    def __init__(self, left: Tensor, right: Tensor, owner: Tensor, num_experts: int):
        if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[0] or owner.shape != (left.shape[1],):
            raise ValueError(
                f"low-rank factors must be left [m, R], right [R, n], owner [R]; got {tuple(left.shape)}, "
                f"{tuple(right.shape)}, {tuple(owner.shape)}"
            )
        if owner.numel() and not 0 <= int(owner.min()) <= int(owner.max()) < num_experts:
            raise ValueError(f"low-rank owner indices must lie in [0, {num_experts}), got {owner.unique().tolist()}")
        self.left, self.right, self.owner, self.num_experts = left, right, owner.long(), num_experts

    @classmethod
    def from_factors(
        cls, factors: Sequence[tuple[Tensor, Tensor] | None], shape: Sequence[int], dtype: torch.dtype | None = None
    ) -> "LowRankStack":
        """One ``(left, right)`` pair per expert, ``None`` for an expert that left the matrix alone."""
        m, n = shape
        present = [(k, pair) for k, pair in enumerate(factors) if pair is not None]
        for k, (left, right) in present:
            if left.shape[0] != m or right.shape[1] != n or left.shape[1] != right.shape[0]:
                raise ValueError(
                    f"expert {k}'s factors {tuple(left.shape)} @ {tuple(right.shape)} do not make the {m}x{n} matrix"
                )
        dtype = dtype or (present[0][1][0].dtype if present else torch.float32)
        left = torch.cat([l for _, (l, _) in present], dim=1) if present else torch.zeros(m, 0)
        right = torch.cat([r for _, (_, r) in present], dim=0) if present else torch.zeros(0, n)
        owner = torch.cat([torch.full((l.shape[1],), k) for k, (l, _) in present]) if present else torch.zeros(0)
        return cls(left.to(dtype), right.to(dtype), owner, len(factors))

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.num_experts, self.left.shape[0], self.right.shape[1]))

    @property
    def rank(self) -> int:
        """``Σ_k r_k``: the rank-one terms over all experts."""
        return self.left.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.left.dtype

    @property
    def device(self) -> torch.device:
        return self.left.device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.left, self.right, self.owner))

    def expert(self, k: int) -> Tensor:
        """``τ_k`` as a dense ``[m, n]`` matrix."""
        terms = self.owner == k
        return self.left[:, terms].float() @ self.right[terms].float()

    def dense(self) -> Tensor:
        """All K task vectors as ``[K, m, n]`` (float32, then the factors' dtype)."""
        return torch.stack([self.expert(k) for k in range(self.num_experts)]).to(self.dtype)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "LowRankStack":
        return LowRankStack(
            self.left.to(device=device, dtype=dtype), self.right.to(device=device, dtype=dtype),
            self.owner.to(device=device), self.num_experts,
        )


def merge_low_rank(base: Tensor, left: Tensor, right: Tensor, owner: Tensor, row_coefficients: Tensor) -> Tensor:
    """``base + (left ⊙ row_coefficients[:, owner]) @ right`` on ``base``'s device, computed in the
    coefficients' dtype (or ``base``'s, if wider) and cast to ``base``'s dtype;
    ``row_coefficients`` is ``[m, K]``, the coefficient each row gives each expert."""
    compute = torch.promote_types(row_coefficients.dtype, base.dtype)
    left = left.to(device=base.device, dtype=compute)
    right = right.to(device=base.device, dtype=compute)
    scaled = left * row_coefficients.to(compute)[:, owner.to(base.device)]
    return torch.addmm(base.to(compute), scaled, right).to(base.dtype)
