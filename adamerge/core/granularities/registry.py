"""The granularity registry: a name → the rule that lays out each tensor's coefficient slots.

A rule is a function ``rule(shapes, **options)``: built once per layout from every tensor's
shape and its own options (its keyword arguments, e.g. ``chunks=``), it returns a function
naming the slot(s) of one tensor in row order: one name for a single coefficient, ``m`` names
for ``m`` contiguous row chunks, none to keep that tensor's coefficient at its initial value.
Tensors that name the same slot share it. :func:`adamerge.core.layouts.build_layout` turns the
names into a :class:`~adamerge.core.layouts.CoefficientLayout`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from adamerge.core.registry import Registry

SlotsOf = Callable[[str], Sequence[str]]
Shapes = Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class LayoutRule:
    """A registered granularity: its rule and the options (keyword arguments) the rule takes."""

    name: str
    build: Callable[..., SlotsOf]
    options: tuple[str, ...]


GRANULARITIES: Registry[LayoutRule] = Registry("granularity")
"""The granularities by name (a recipe's ``coefficients.granularity``)."""


def register_granularity(name: str):
    """Register ``rule(shapes, **options)`` under ``name`` with the options it takes."""

    def decorate(rule):
        options = tuple(inspect.signature(rule).parameters)[1:]
        GRANULARITIES.register(name, LayoutRule(name, rule, options))
        return rule

    return decorate


def option_names() -> set[str]:
    """Every option some registered rule takes."""
    return {option for rule in GRANULARITIES.values() for option in rule.options}


def misplaced_options(granularity: str, options: Mapping[str, object], label=repr) -> list[str]:
    """One message per option given (not ``None``) that ``granularity``'s rule does not take,
    naming the granularity that does: such an option would otherwise be ignored in silence."""
    rule = GRANULARITIES.get(granularity)
    problems = []
    for option, value in options.items():
        if value is None or option in rule.options:
            continue
        owners = [other.name for other in GRANULARITIES.values() if option in other.options]
        if owners:
            used = " or ".join(repr(owner) for owner in owners)
            problems.append(f"{label(option)} is only used with granularity {used}, not {granularity!r}")
        else:
            problems.append(f"{label(option)} is not an option of any granularity; {granularity!r} takes {list(rule.options)}")
    return problems
