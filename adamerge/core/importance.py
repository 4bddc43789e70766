"""Expert Merging++: give important tensors more (chunk-wise) coefficients.

After a first, layer-wise stage, a tensor's importance is how much merged change it
carries: ``I_ℓ ∝ Σ_k |c_k^ℓ| · ||τ_k^ℓ||_1`` (learned coefficient × task-vector magnitude,
which grows with the tensor's size), normalised over tensors. A budget of ``B`` chunks is
shared as ``m_ℓ = floor(B · I_ℓ^κ / Σ_j I_j^κ)``, capped at the tensor's first dimension;
``m_ℓ = 0`` keeps that tensor's coefficient fixed at its (stage-1) value. A recipe asks for it
with ``coefficients.chunks: {importance_from: <stage-1 coefficients.safetensors>, budget, kappa}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from adamerge.core.coefficients import MergeCoefficients
from adamerge.core.task_vectors import TaskVectors


def tensor_importance(coefficients: MergeCoefficients, task_vectors: TaskVectors) -> dict[str, float]:
    """``I_ℓ``: ``Σ_k |c_k^ℓ| ||τ_k^ℓ||_1`` per tensor, normalised to sum to one.

    For chunked or grouped coefficients, ``c_k^ℓ`` is the row-weighted mean of |c| over the tensor.
    """
    norms = task_vectors.l1_norms()
    missing = [k for k in task_vectors.keys if k not in coefficients.layout.tensor_slots]
    if missing:
        raise KeyError(f"the stage-1 coefficients do not cover tensor {missing[0]!r}")
    with torch.no_grad():
        values = coefficients()
        raw = {key: float((coefficients.row_values(key, values).abs().mean(dim=1) * norms[key]).sum()) for key in norms}
    total = sum(raw.values())
    if total <= 0:
        raise ValueError("all tensors have zero importance: the task vectors or coefficients are zero")
    return {key: value / total for key, value in raw.items()}


def allocate_chunks(importance: Mapping[str, float], budget: int, rows: Mapping[str, int], kappa: float = 1.0) -> dict[str, int]:
    """``m_ℓ = floor(B · I_ℓ^κ / Σ_j I_j^κ)``, capped at each tensor's rows."""
    if budget < 1:
        raise ValueError(f"the chunk budget must be >= 1, got {budget}")
    powered = {key: value**kappa for key, value in importance.items()}
    total = sum(powered.values())
    return {key: min(rows[key], int(budget * value / total)) for key, value in powered.items()}


def importance_chunks(
    stage1: MergeCoefficients | str, task_vectors: TaskVectors, budget_per_tensor: float = 4.0, kappa: float = 1.0
) -> dict[str, int]:
    """The chunk map for stage 2: a budget of ``budget_per_tensor × (number of tensors)`` chunks."""
    stage1 = stage1 if isinstance(stage1, MergeCoefficients) else MergeCoefficients.load(stage1)
    importance = tensor_importance(stage1, task_vectors)
    rows = {key: (t.shape[1] if t.dim() > 1 else 1) for key, t in task_vectors.items()}
    return allocate_chunks(importance, int(budget_per_tensor * len(importance)), rows, kappa)


def resolve_chunks(chunks, task_vectors: TaskVectors):
    """A recipe's ``coefficients.chunks`` as given, or allocated by importance from a stage-1 run:
    ``{importance_from: <coefficients.safetensors>, budget: 4, kappa: 1}`` (``budget`` chunks
    per tensor on average, ``kappa`` the sharpening exponent)."""
    if not isinstance(chunks, Mapping) or "importance_from" not in chunks:
        return chunks
    options = dict(chunks)
    source = options.pop("importance_from")
    budget, kappa = options.pop("budget", 4.0), options.pop("kappa", 1.0)
    if options:
        raise ValueError(f"coefficients.chunks: unknown importance option(s) {sorted(options)}; use budget, kappa")
    if not isinstance(source, (str, Path)):
        raise ValueError(f"coefficients.chunks.importance_from must be a coefficients file path, got {source!r}")
    if not _is_number(budget) or budget <= 0:
        raise ValueError(f"coefficients.chunks.budget must be a number > 0, got {budget!r}")
    if not _is_number(kappa) or kappa < 0:
        raise ValueError(f"coefficients.chunks.kappa must be a number >= 0, got {kappa!r}")
    return importance_chunks(str(Path(source).expanduser()), task_vectors, float(budget), float(kappa))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
