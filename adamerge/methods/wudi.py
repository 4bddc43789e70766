"""WUDI-Merging (Cheng et al., "Whoever Started the Interference Should End It: Guiding
Data-Free Model Merging via Task Vectors", ICML 2025, arXiv 2503.08099).

A linear layer's task vector approximately spans the inputs it was fine-tuned on, so the
interference of a merged update ``τ_m`` on task ``k`` is measured through ``τ_k`` itself.
Per linear-layer weight matrix the merged update minimises

    L(τ_m) = Σ_k ‖(τ_m − τ_k) τ_kᵀ‖_F² / ‖τ_k‖_F²

by Adam, layer by layer, from the task-arithmetic sum ``Σ_k τ_k``. Paper / official-code
defaults: 300 iterations, learning rate ``1e-5`` (the ViT code; the RoBERTa code uses
``2e-5``), Adam's default betas and no weight decay, no rescaling of the result
(``scaling = 1``). The weights are ``1/‖τ_k‖_F²`` as in the paper's objective and the RoBERTa
code (the ViT script divides by ``‖τ_k‖_F``). 300 steps at ``1e-5`` move an entry by at most
about ``3·10⁻³``: the result stays near the start, not at the quadratic's exact minimiser —
keep the paper's budget, a closed-form solve is a different method.

Which tensors are optimised: every 2-D weight except embedding tables, following the
official code (its RoBERTa script excludes ``.*embeddings.*``, ``.*LayerNorm.*``, biases and
the classifier; its ViT script optimises only the attention and MLP weight matrices).
Every other tensor in the scope (biases, LayerNorm, embeddings) keeps its pretrained value
there (``others="pretrained"``, the default); ``others="mean"`` gives them
``mean_k τ_k`` instead, as FusionBench's port does for non-2-D tensors.

The optimiser runs on CUDA when available (``device="auto"``); results come back on the
task vectors' device. Adam is fed the exact gradient of :func:`wudi_loss` (what autograd
gives), ``2 Σ_k w_k (τ_m − τ_k) τ_kᵀτ_k`` with ``w_k = 1/‖τ_k‖_F²``, computed in whichever of
two equivalent orders is cheaper for the shape: with the ``n × n`` Gram ``Σ_k w_k τ_kᵀτ_k`` a
step is one ``(m × n)(n × n)`` product instead of autograd's ``2K`` products through ``m × m``.
The Gram and its constant offset are formed task by task, the offset through the smaller of
``m × m`` and ``n × n``: an untied LM head never builds vocabulary², nor any copy of the
``[K, m, n]`` stack, so the solve holds the stack and a few ``m × n`` matrices
(``benchmarks/wudi_memory.py``, ``benchmarks/llama3_memory.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from adamerge.io.checkpoints import WeightsSource
from adamerge.methods.base import (
    METHODS,
    MergeResult,
    embedding_keys,
    is_matrix,
    merge_each,
    task_vectors,
)
from adamerge.core.scope import Experts, Patterns

Others = Literal["pretrained", "mean"]


def inverse_square_norms(taus: Tensor) -> Tensor:
    """``w_k = 1/‖τ_k‖_F²`` (``[K]``); a zero task vector gets weight 0 (its term is 0 anyway)."""
    norms = torch.linalg.vector_norm(taus.flatten(1), dim=1).square()  # a reduction: no squared copy of the stack
    inverse = 1.0 / norms.clamp_min(torch.finfo(norms.dtype).tiny)
    return torch.where(norms > 0, inverse, torch.zeros_like(norms))


def wudi_loss(merged: Tensor, taus: Tensor) -> Tensor:
    """WUDI's objective ``Σ_k ‖(τ_m − τ_k) τ_kᵀ‖_F² / ‖τ_k‖_F²``.

    ``merged`` is ``[m, n]``, ``taus`` ``[K, m, n]``; computed in the inputs' dtype (float64 in
    gradient checks), differentiable in ``merged``.
    """
    product = (merged.unsqueeze(0) - taus) @ taus.transpose(1, 2)
    return (inverse_square_norms(taus) * product.square().sum(dim=(1, 2))).sum()


def wudi_gradient(taus: Tensor, anchor: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """``τ_m ↦ ∂L/∂τ_m = 2 Σ_k w_k (τ_m − τ_k) τ_kᵀ τ_k``, in the cheaper order for the shape.

    With the ``n × n`` Gram ``A`` the gradient is ``2 ((τ_m − a) A + Σ_k w_k (a − τ_k) τ_kᵀτ_k)``
    around an ``anchor`` ``a`` (default ``Σ_k τ_k``, the optimiser's start): residuals are
    formed before the products, as autograd does on :func:`wudi_loss`, so a zero gradient
    stays exactly zero instead of becoming float32 noise that Adam would amplify to
    ``lr``-sized steps.
    """
    num_tasks, m, n = taus.shape
    weights = inverse_square_norms(taus)
    if n <= 2 * num_tasks * m:  # n × n Gram: one m·n² product per step
        anchor = taus.sum(dim=0) if anchor is None else anchor
        gram = sum(w * (tau.T @ tau) for w, tau in zip(weights, taus))  # A = Σ_k w_k τ_kᵀ τ_k, task by task
        offset = gram_offset(anchor, taus, weights)

        def gradient(merged: Tensor) -> Tensor:
            return 2.0 * ((merged - anchor) @ gram + offset)

    else:  # few, wide rows: K products through m × m per step
        weighted = weights.view(-1, 1, 1) * taus

        def gradient(merged: Tensor) -> Tensor:
            residual = (merged.unsqueeze(0) - taus) @ weighted.transpose(1, 2)
            return 2.0 * (residual @ taus).sum(dim=0)

    return gradient


def gram_offset(anchor: Tensor, taus: Tensor, weights: Tensor) -> Tensor:
    """``Σ_k w_k (a − τ_k) τ_kᵀ τ_k`` (``m × n``), one task at a time, through the smaller of the
    ``m × m`` and ``n × n`` intermediates (an untied LM head's ``m × m`` is vocabulary², far past memory)."""
    offset = torch.zeros_like(anchor)
    for tau, w in zip(taus, weights):
        residual = anchor - tau
        offset += (w * (residual @ tau.T)) @ tau if tau.shape[0] <= tau.shape[1] else residual @ (w * (tau.T @ tau))
    return offset


def resolve_device(device: torch.device | str) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def wudi_delta(
    taus: Tensor, iterations: int = 300, lr: float = 1e-5, device: torch.device | str = "auto"
) -> Tensor:
    """WUDI's merged update for stacked task matrices ``taus`` (``[K, m, n]``): Adam on
    :func:`wudi_loss` for ``iterations`` steps from ``Σ_k τ_k``; float32, returned on ``taus``' device."""
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    target = resolve_device(device)
    stacked = taus.detach().to(device=target, dtype=torch.float32)
    start = stacked.sum(dim=0)
    merged = nn.Parameter(start.clone())
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0.0)
    gradient = wudi_gradient(stacked, anchor=start)
    for _ in range(iterations):
        merged.grad = gradient(merged.detach())
        optimizer.step()
    return merged.detach().to(taus.device)


@METHODS.register("wudi")
def wudi(
    pretrained: WeightsSource,
    experts: Experts,
    iterations: int = 300,
    lr: float = 1e-5,
    scaling: float = 1.0,
    others: Others = "pretrained",
    device: str = "auto",
    include: Patterns = None,
    exclude: Patterns = None,
) -> MergeResult:
    """WUDI-Merging: each linear-layer weight solved by Adam on :func:`wudi_loss`; embedding
    tables and non-matrix tensors keep ``θ_0`` (``others="pretrained"``) or get the mean."""
    if others not in ("pretrained", "mean"):
        raise ValueError(f"others must be 'pretrained' or 'mean', got {others!r}")
    tv = task_vectors(pretrained, experts, include, exclude)
    tables = embedding_keys(pretrained, tv.keys)

    def rule(key: str, t: Tensor) -> Tensor | None:
        if is_matrix(t) and key not in tables:
            return scaling * wudi_delta(t, iterations, lr, device)
        return scaling * t.float().mean(dim=0) if others == "mean" else None

    return merge_each(pretrained, tv, rule, "WUDI: optimising layers")
