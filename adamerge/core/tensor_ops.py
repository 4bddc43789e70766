"""Pure tensor functions behind TIES, DARE and friends.

One vocabulary throughout: a stacked tensor ``x`` has the experts on dim 0, so
``x[k]`` is expert k's task vector for one parameter tensor (shape ``[K, *shape]``).

References: TIES-Merging (Yadav et al., 2023, arXiv:2306.01708), DARE (Yu et al., 2024,
arXiv:2311.03099).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

SignMethod = Literal["sum", "count"]


def keep_count(numel: int, density: float) -> int:
    """How many entries a top-``density`` trim keeps out of ``numel`` (at least one)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return max(1, min(numel, math.ceil(density * numel)))


def magnitude_threshold(values: Tensor, density: float) -> Tensor:
    """The smallest magnitude kept when keeping the top ``density`` fraction of ``values``."""
    flat = values.detach().abs().flatten().float()
    k = keep_count(flat.numel(), density)
    return flat.topk(k, sorted=False).values.min()


def trim(x: Tensor, density: float) -> Tensor:
    """TIES step 1 (trim), per expert: keep each expert's top-``density`` entries by magnitude.

    Exactly ``ceil(density * n)`` entries survive per expert (ties broken by ``topk``).
    """
    flat = x.flatten(1)
    k = keep_count(flat.shape[1], density)
    index = flat.abs().topk(k, dim=1, sorted=False).indices
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, index, True)
    return (flat * mask).view_as(x)


def trim_below(x: Tensor, thresholds: Tensor) -> Tensor:
    """Zero entries whose magnitude is below each expert's threshold (``thresholds``: ``[K]``)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    return x * (x.abs() >= thresholds.to(x.dtype).view(shape))


def elect_sign(x: Tensor, method: SignMethod = "sum") -> Tensor:
    """TIES step 2 (elect): the sign with the larger total mass (``sum``) or more votes (``count``).

    Returns a ``+1/-1`` tensor of shape ``x.shape[1:]``; an exact tie elects ``+1``.
    """
    if method == "sum":
        total = x.sum(dim=0)
    elif method == "count":
        total = x.sign().sum(dim=0)
    else:
        raise ValueError(f"unknown sign election method {method!r}; use 'sum' or 'count'")
    return torch.where(total >= 0, 1.0, -1.0).to(x.dtype)


def agrees(x: Tensor, sign: Tensor) -> Tensor:
    """Boolean mask of entries that are non-zero and share the elected sign."""
    return (x != 0) & (x.sign() == sign.unsqueeze(0))


def disjoint_mean(x: Tensor, sign: Tensor) -> Tensor:
    """TIES step 3 (disjoint merge): mean over the experts that agree with the elected sign.

    We follow the TIES paper and PEFT: divide by the number of agreeing experts. (mergekit's
    ``ties`` normalises by the sum of the agreeing experts' weights instead.)
    """
    mask = agrees(x, sign)
    count = mask.sum(dim=0).clamp(min=1)
    return (x * mask).sum(dim=0) / count


def dare(x: Tensor, density: float, generator: torch.Generator, rescale: bool = True) -> Tensor:
    """DARE: drop each entry with probability ``1 - density``, rescale survivors by ``1/density``."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    keep = (torch.rand(x.shape, generator=generator) < density).to(x.device)
    kept = x * keep
    return kept / density if rescale else kept
