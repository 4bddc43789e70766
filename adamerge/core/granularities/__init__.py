"""Granularities: registered rules for which coefficient slot(s) each merged tensor reads.

One module per rule (see :mod:`.registry` for what a rule is, and ``GRANULARITIES``, the
registry); importing this package registers the built-in ones.
"""

# registers them, from the coarsest to the finest
from adamerge.core.granularities import task, layer, group, chunk, element, spectral  # noqa: F401, I001
from adamerge.core.granularities.chunk import ChunkSpec
from adamerge.core.granularities.group import GroupSpec, block_of, module_of
from adamerge.core.granularities.registry import (
    GRANULARITIES,
    LayoutRule,
    misplaced_options,
    option_names,
    register_granularity,
)

__all__ = [
    "GRANULARITIES", "ChunkSpec", "GroupSpec", "LayoutRule", "block_of",
    "misplaced_options", "module_of", "option_names", "register_granularity",
]
