"""``layer``: one coefficient per expert and tensor (layer-wise AdaMerging)."""

from __future__ import annotations

from adamerge.core.granularities.registry import Shapes, SlotsOf, register_granularity


@register_granularity("layer")
def layer(shapes: Shapes) -> SlotsOf:
    return lambda key: (key,)
