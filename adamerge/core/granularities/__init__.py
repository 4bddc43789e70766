"""Granularities: registered rules for which coefficient slot(s) each merged tensor reads.

One module per rule (see :mod:`.registry` for what a rule is); importing this package
registers the built-in ones, in the order error messages list them.
"""

# registers them, in this order (kept unsorted on purpose)
from adamerge.core.granularities import task, layer, group, chunk, element  # noqa: F401, I001
from adamerge.core.granularities.chunk import ChunkSpec
from adamerge.core.granularities.group import GroupSpec, block_of, module_of
from adamerge.core.granularities.registry import (
    GRANULARITIES,
    LayoutRule,
    get_granularity,
    misplaced_options,
    option_names,
    register_granularity,
)

__all__ = [
    "GRANULARITIES", "ChunkSpec", "GroupSpec", "LayoutRule", "block_of", "get_granularity",
    "misplaced_options", "module_of", "option_names", "register_granularity",
]
