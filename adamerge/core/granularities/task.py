"""``task``: one coefficient per expert for the whole model (Task Arithmetic / task-wise AdaMerging)."""

from __future__ import annotations

from adamerge.core.granularities.registry import Shapes, SlotsOf, register_granularity


@register_granularity("task")
def task(shapes: Shapes) -> SlotsOf:
    return lambda key: ("all",)
