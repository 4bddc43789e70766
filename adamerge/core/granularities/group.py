"""``group``: one coefficient per group of tensors, e.g. per transformer block.

``groups="block"`` (the default) gives one group per numbered block (``encoder.layer.3``) and
one per other module; ``{group_name: regex}`` or a list of regexes puts a tensor in the first
group whose regex it matches, and unmatched tensors in the shared group ``"other"``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Union

from adamerge.core.granularities.registry import Shapes, SlotsOf, register_granularity

GroupSpec = Union[str, Sequence[str], Mapping[str, str], None]
_INDEX = re.compile(r"(^|\.)(\d+)(\.|$)")


def block_of(name: str) -> str | None:
    """The block a parameter belongs to: its name up to the first numeric component, if any.

    ``encoder.layer.3.attention.self.query.weight`` → ``encoder.layer.3``.
    """
    match = _INDEX.search(name)
    return name[: match.end(2)] if match else None


def module_of(name: str) -> str:
    """The module that owns a parameter (``a.b.weight`` → ``a.b``)."""
    return name.rsplit(".", 1)[0] if "." in name else name


@register_granularity("group")
def group(shapes: Shapes, groups: GroupSpec = None) -> SlotsOf:
    if groups is None or groups == "block":
        return lambda key: (block_of(key) or module_of(key),)
    if isinstance(groups, str):
        raise ValueError(f"unknown groups {groups!r}; use 'block', a list of regexes or a name -> regex map")
    named = dict(groups) if isinstance(groups, Mapping) else {p: p for p in groups}
    compiled = [(name, re.compile(pattern)) for name, pattern in named.items()]
    return lambda key: (next((name for name, pattern in compiled if pattern.search(key)), "other"),)
