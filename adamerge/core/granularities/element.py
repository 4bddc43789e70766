"""``element``: one slot per tensor, as ``layer``, whose coefficient holds one value per entry.

The slot names are the layer-wise ones; :class:`~adamerge.core.element.ElementCoefficients`
gives each slot the tensor's shape (the layout's granularity name tells the two apart).
"""

from __future__ import annotations

from adamerge.core.granularities.registry import Shapes, SlotsOf, register_granularity


@register_granularity("element")
def element(shapes: Shapes) -> SlotsOf:
    return lambda key: (key,)
