"""One validation pass over a loaded recipe, before any model or data is read.

The schema (``config.py``) checks keys, types and closed choices (constraint, optimiser,
storage dtype, TIES options, FW mode and LMO); this checks what a type cannot: every name of a
registered component (granularity, task balance, merge method, objective) against its
registry, and the rules across sections (which sections exclude each other, what progressive
learning refuses). A bad value costs milliseconds and an error naming the key, not a model
load. The registries are the ones the components are looked up in, so the two cannot drift
apart.
"""

from __future__ import annotations

import difflib
import re

from omegaconf import DictConfig

from adamerge.core.granularities import GRANULARITIES, misplaced_options, option_names
from adamerge.core.registry import Registry
from adamerge.methods import METHODS
from adamerge.objectives import OBJECTIVES
from adamerge.objectives.balance import BALANCES

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class RecipeError(ValueError):
    """A recipe that does not fit the schema (unknown key, wrong type, missing value) or its rules."""


def check_name(name: object, what: str = "task") -> str:
    """A task or expert name safe to use as a file name: letters, digits, ``_``, ``-`` and ``.``
    (not ``.`` or ``..``), so no name can point a written file outside the run directory."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", "..") or ".." in name:
        raise ValueError(f"{what} name {name!r} is not allowed: use letters, digits, '_', '-' and '.' (no '..')")
    return name



def _registered(recipe: DictConfig) -> dict[str, tuple[str, Registry]]:
    """``dotted key -> (name, registry)`` for every registered component the recipe names; an
    objective given as a dotted path is imported when it is built, not here."""
    names = {
        "coefficients.granularity": (recipe.coefficients.granularity, GRANULARITIES),
        "task_balance": (recipe.task_balance, BALANCES),
    }
    if recipe.method is not None:
        names["method.name"] = (recipe.method.name, METHODS)
    if recipe.task_vectors.start is not None:
        names["task_vectors.start.method"] = (recipe.task_vectors.start.method, METHODS)
    if recipe.frank_wolfe is not None:
        names["frank_wolfe.inner_granularity"] = (recipe.frank_wolfe.inner_granularity, GRANULARITIES)
    objectives = {f"objectives[{i}].name": objective.name for i, objective in enumerate(recipe.objectives)}
    if recipe.selection is not None:
        objectives["selection.objective.name"] = recipe.selection.objective.name
    names.update({key: (name, OBJECTIVES) for key, name in objectives.items() if not set(name) & set(":.")})
    return names


def _exclusive(recipe: DictConfig) -> list[str]:
    """Problems with how the recipe's sections combine."""
    problems = []
    learned = [name for name in ("frank_wolfe", "progressive", "selection") if recipe[name] is not None]
    if recipe.method is not None and learned:
        problems.append(f"`method` (a data-free merge) cannot be combined with {', '.join(f'`{n}`' for n in learned)}")
    if recipe.frank_wolfe is not None and recipe.progressive is not None:
        problems.append("a recipe runs FW-Merging (`frank_wolfe`) or progressive distillation (`progressive`), not both")
    if recipe.frank_wolfe is not None and recipe.frank_wolfe.inner_granularity == "element":
        soft = [name for name in GRANULARITIES if name != "element"]
        problems.append(f"frank_wolfe.inner_granularity is 'element'; soft FW-Merging takes one of {soft}")
    if recipe.frank_wolfe is not None and recipe.selection is not None:
        problems.append(
            "FW-Merging (`frank_wolfe`) has no `selection`: its state is the merged weights themselves, and keeping "
            "the best iterate would hold a second copy of the model (the task losses' `task_balance` does apply)"
        )
    if recipe.progressive is not None:
        if recipe.selection is not None or recipe.task_balance != "sum":
            problems.append("progressive learning has no `selection` or `task_balance` (every block matches its experts directly)")
        if any(recipe.task_vectors[name] is not None for name in ("ties", "dare", "tsv", "start")):
            problems.append(
                "progressive learning reads one block's task vectors at a time: task_vectors.ties/dare/tsv/start are not supported"
            )
        chunks = recipe.coefficients.chunks
        if isinstance(chunks, DictConfig) and "importance_from" in chunks:
            problems.append("progressive learning takes explicit coefficients.chunks, not importance_from (it needs every task vector)")
        if recipe.coefficients.granularity == "task":
            problems.append("progressive learning trains one block at a time: coefficients.granularity 'task' spans every block")
        if recipe.progressive.stream and recipe.coefficients.granularity == "element":
            problems.append(
                "progressive.stream keeps every coefficient in memory: element-wise ones are as large as the task "
                "vectors; use coefficients.granularity layer, chunk or group"
            )
    layout_options = {name: recipe.coefficients[name] for name in option_names() if name in recipe.coefficients}
    problems += misplaced_options(recipe.coefficients.granularity, layout_options, label=lambda name: f"coefficients.{name}")
    if recipe.coefficients.constraint.name == "none" and (
        recipe.coefficients.constraint.lo is not None or recipe.coefficients.constraint.hi is not None
    ):
        problems.append("coefficients.constraint: lo/hi need a constraint name (clamp or sigmoid)")
    return problems


def closest_hint(value: object, allowed) -> str:
    """`` (did you mean 'x'?)`` for the allowed value closest to a mistyped one, else nothing."""
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_recipe(recipe: DictConfig, origin: str = "recipe") -> None:
    """Raise ``RecipeError`` naming the first bad key (with the closest allowed value) or rule."""
    for key, (name, registry) in _registered(recipe).items():
        if name not in registry:
            raise RecipeError(f"{origin}: {key}: {registry.unknown_message(name)}")
    problems = _exclusive(recipe)
    if problems:
        raise RecipeError(f"{origin}: {problems[0]}")
