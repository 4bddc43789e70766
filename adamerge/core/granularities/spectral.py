"""``spectral``: one coefficient per singular component of every expert's matrix (AdaRank).

Each 2-D tensor's task vectors are split by SVD, ``τ_k = Σ_j σ_kj u_kj v_kjᵀ``, and slot ``j``
of the tensor scales component ``j`` of every expert (:mod:`adamerge.core.spectral` holds the
factors and merges them). Without ``rank`` every component (``min(m, n)``) has a slot; with
``rank: r`` only the top ``r`` do and one more slot, ``[rest]``, scales ``τ_k`` minus its rank-``r``
part (``r ≥ min(m, n) - 1`` leaves a rest of at most one component: that component's own slot
then, and no rest). Tensors that are not matrices get one slot each, as ``layer``.
"""

from __future__ import annotations

from adamerge.core.granularities.registry import Shapes, SlotsOf, register_granularity


@register_granularity("spectral")
def spectral(shapes: Shapes, rank: int | None = None) -> SlotsOf:
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer (components per matrix), got {rank!r}")

    def slots(key: str) -> tuple[str, ...]:
        shape = tuple(shapes[key])
        if len(shape) != 2:
            return (key,)
        full = min(shape)
        count = full if rank is None or rank >= full - 1 else rank
        components = tuple(f"{key}[sv{j}]" for j in range(count))
        return components if count == full else (*components, f"{key}[rest]")

    return slots
