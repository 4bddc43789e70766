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
from adamerge.learning.contract import unhonoured_trainer_fields
from adamerge.learning.evolution import MAX_DIMENSIONS, option_problems
from adamerge.learning.optimizers import SEARCHES
from adamerge.methods import METHODS
from adamerge.methods.base import PER_TENSOR_METHODS
from adamerge.methods.calibration import needs_calibration
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


# The ``trainer`` fields each learner honours beyond the device, batch size, bar, threads and TF32
# (every learner's): the Lightning learner is Lightning, so it takes them all; progressive
# distillation, FW-Merging and CMA-ES run their own loops on one device in float32.
HONOURED_TRAINER_FIELDS = {
    "coefficients": frozenset({"max_steps", "devices", "strategy", "precision", "log_every_n_steps",
                               "checkpoint_every_n_steps", "per_task_backward", "loggers", "callbacks", "extra",
                               "data_workers", "stream"}),
    "progressive": frozenset({"devices"}),
    "frank_wolfe": frozenset({"devices"}),
    "cmaes": frozenset({"devices"}),
}
_INSTEAD = {  # what a learner does instead of a trainer field it does not honour
    ("progressive", "max_steps"): "it trains progressive.epochs over the samples of every block",
    ("frank_wolfe", "max_steps"): "it runs frank_wolfe.iterations, each with inner_steps for soft FW",
    ("progressive", "checkpoint_every_n_steps"): "it checkpoints after every block",
    ("cmaes", "max_steps"): "it runs optimizer.args.generations",
    ("cmaes", "checkpoint_every_n_steps"): "it checkpoints after every generation",
}


def learner_name(recipe: DictConfig) -> str:
    """The learner a ``fit`` recipe runs: FW-Merging, progressive distillation, CMA-ES or the Lightning learner."""
    if recipe.frank_wolfe is not None:
        return "frank_wolfe"
    if recipe.progressive is not None:
        return "progressive"
    return recipe.optimizer.name if recipe.optimizer.name in SEARCHES else "coefficients"  # a search is its own learner


def _unhonoured(recipe: DictConfig, defaults) -> list[str]:
    """A ``trainer`` field the recipe's learner would ignore, named with the learner: never ignored in silence."""
    if recipe.method is not None:
        return []
    learner = learner_name(recipe)
    problems = []
    for name in unhonoured_trainer_fields(HONOURED_TRAINER_FIELDS[learner], recipe.trainer, defaults):
        instead = _INSTEAD.get((learner, name), "it runs its own loop on one device in float32")
        problems.append(f"trainer.{name} is set, but the {learner} learner does not use it ({instead}); remove it")
    devices = recipe.trainer.devices
    if learner != "coefficients" and not (devices == 1 or (not isinstance(devices, (int, str)) and len(devices) == 1)):
        problems.append(f"trainer.devices is {devices!r}, but the {learner} learner runs on one device; use 1 or [index]")
    if learner == "progressive" and len(recipe.objectives) > 0:
        problems.append("objectives lists an objective, but progressive learning matches each block's features to the "
                        "experts' (an MSE); write `objectives: []`")
    return problems


def _exclusive(recipe: DictConfig) -> list[str]:
    """Problems with how the recipe's sections combine."""
    problems = []
    learned = [name for name in ("frank_wolfe", "progressive", "selection") if recipe[name] is not None]
    if recipe.method is not None and learned:
        problems.append(f"`method` (a merge without learning) cannot be combined with {', '.join(f'`{n}`' for n in learned)}")
    if recipe.frank_wolfe is not None and recipe.progressive is not None:
        problems.append("a recipe runs FW-Merging (`frank_wolfe`) or progressive distillation (`progressive`), not both")
    if recipe.frank_wolfe is not None and recipe.frank_wolfe.inner_granularity in ("element", "spectral"):
        soft = [name for name in GRANULARITIES if name not in ("element", "spectral")]
        problems.append(f"frank_wolfe.inner_granularity is {recipe.frank_wolfe.inner_granularity!r}; soft FW-Merging takes one of {soft}")
    if recipe.frank_wolfe is not None and recipe.selection is not None:
        problems.append(
            "FW-Merging (`frank_wolfe`) has no `selection`: its state is the merged weights themselves, and keeping "
            "the best iterate would hold a second copy of the model (the task losses' `task_balance` does apply)"
        )
    if recipe.progressive is not None:
        if recipe.selection is not None or recipe.task_balance != "sum":
            problems.append("progressive learning has no `selection` or `task_balance` (every block matches its experts directly)")
        if any(recipe.task_vectors[name] is not None for name in ("ties", "dare", "tsv")):
            problems.append(
                "progressive learning reads one block's task vectors at a time: task_vectors.ties/dare/tsv are not "
                "supported (task_vectors.start with a per-tensor method is)"
            )
        problems += _per_tensor_start(recipe.task_vectors.start)
        chunks = recipe.coefficients.chunks
        if isinstance(chunks, DictConfig) and "importance_from" in chunks:
            problems.append("progressive learning takes explicit coefficients.chunks, not importance_from (it needs every task vector)")
        if recipe.coefficients.granularity == "task":
            problems.append("progressive learning trains one block at a time: coefficients.granularity 'task' spans every block")
        if recipe.coefficients.granularity == "spectral":
            problems.append("progressive learning lays coefficients out from shapes alone: coefficients.granularity 'spectral' "
                            "needs each expert's SVD; use layer, chunk, group or element")
        if recipe.progressive.stream and recipe.coefficients.granularity == "element":
            problems.append(
                "progressive.stream keeps every coefficient in memory: element-wise ones are as large as the task "
                "vectors; use coefficients.granularity layer, chunk or group"
            )
    if recipe.trainer.stream and learner_name(recipe) == "coefficients":
        problems += _streamed_fit(recipe)
    layout_options = {name: recipe.coefficients[name] for name in option_names() if name in recipe.coefficients}
    problems += misplaced_options(recipe.coefficients.granularity, layout_options, label=lambda name: f"coefficients.{name}")
    if recipe.coefficients.constraint.name == "none" and (
        recipe.coefficients.constraint.lo is not None or recipe.coefficients.constraint.hi is not None
    ):
        problems.append("coefficients.constraint: lo/hi need a constraint name (clamp, sigmoid or mask)")
    return problems


def _search(recipe: DictConfig) -> list[str]:
    """Problems with a derivative-free search (``optimizer.name: cmaes``) and the objectives only it minimises."""
    if recipe.method is not None:
        return []
    scored = {f"objectives[{i}].name": o.name for i, o in enumerate(recipe.objectives)
              if o.name in OBJECTIVES and getattr(OBJECTIVES.get(o.name), "scores_validation", False)}
    if recipe.optimizer.name != "cmaes":
        problems = [f"{key} is {name!r}, which has no gradient: only optimizer.name cmaes searches it"
                    for key, name in scored.items()]
        if recipe.optimizer.args:
            problems.append(f"optimizer.args are CMA-ES's; optimizer.name is {recipe.optimizer.name!r} (use cmaes or remove them)")
        return problems
    problems = []
    learned = [f"`{name}`" for name in ("frank_wolfe", "progressive", "selection") if recipe[name] is not None]
    if learned:
        problems.append(f"optimizer.name cmaes searches the coefficients itself; it cannot be combined with {', '.join(learned)}")
    if recipe.coefficients.granularity == "element":
        problems.append(f"coefficients.granularity is 'element' (one coefficient per entry); CMA-ES searches at most "
                        f"{MAX_DIMENSIONS}: use task, layer, group or chunk")
    if scored and len(recipe.objectives) > 1:
        problems.append(f"{next(iter(scored))} scores each task's validation rows; list it alone in objectives")
    return problems + option_problems(recipe.optimizer.args)


def _streamed_fit(recipe: DictConfig) -> list[str]:
    """``trainer.stream`` merges each block from its own tensors when it runs."""
    problems = []
    if recipe.trainer.per_task_backward:
        problems.append("trainer.per_task_backward detaches the whole merged model; with trainer.stream every block is "
                        "merged inside the backward already: remove it")
    if recipe.coefficients.granularity == "element":
        problems.append("trainer.stream keeps every coefficient in memory: element-wise ones are as large as the task "
                        "vectors; use coefficients.granularity task, layer, chunk or group")
    if recipe.coefficients.granularity == "spectral":
        problems.append("trainer.stream lays coefficients out from shapes alone: coefficients.granularity 'spectral' needs "
                        "each expert's SVD; use task, layer, chunk or group")
    if any(recipe.task_vectors[name] is not None for name in ("ties", "dare", "tsv")):
        problems.append("trainer.stream reads one block's task vectors at a time: task_vectors.ties/dare/tsv are not "
                        "supported (task_vectors.start with a per-tensor method is)")
    devices = recipe.trainer.devices
    if not (devices == 1 or (not isinstance(devices, (int, str)) and len(devices) == 1)):
        problems.append(f"trainer.devices is {devices!r}: trainer.stream runs on one device; use 1 or [index]")
    chunks = recipe.coefficients.chunks
    if isinstance(chunks, DictConfig) and "importance_from" in chunks:
        problems.append("trainer.stream takes explicit coefficients.chunks, not importance_from (it needs every task vector)")
    return problems + _per_tensor_start(recipe.task_vectors.start)


def _per_tensor_start(start) -> list[str]:
    """A progressive run computes its start block by block: only a method that merges each tensor
    from its own task vectors gives the same start as the whole model's merge."""
    if start is None or start.method not in METHODS:
        return []
    if start.method not in PER_TENSOR_METHODS:
        return [f"task_vectors.start.method {start.method!r} needs the whole model at once; progressive and streamed "
                f"learning compute the start block by block: use one of {sorted(PER_TENSOR_METHODS)}"]
    if start.method == "ties" and start.args.get("trim_scope", "model") != "tensor":
        return ["task_vectors.start: TIES trims over the whole model by default; progressive and streamed learning "
                "compute the start block by block: set task_vectors.start.args.trim_scope: tensor"]
    return []


def _data_free_start(start) -> list[str]:
    """A start is merged before any data is read: a method that runs the experts on calibration data
    cannot be one."""
    if start is None or start.method not in METHODS or not needs_calibration(METHODS.get(start.method)):
        return []
    return [f"task_vectors.start.method {start.method!r} runs the experts on calibration data; a start is merged "
            "without data: use a data-free method, or run it with `adamerge merge` (method: {name: ...})"]


def closest_hint(value: object, allowed) -> str:
    """`` (did you mean 'x'?)`` for the allowed value closest to a mistyped one, else nothing."""
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_recipe(recipe: DictConfig, trainer_defaults, origin: str = "recipe") -> None:
    """Raise ``RecipeError`` naming the first bad key (with the closest allowed value) or rule;
    ``trainer_defaults``: the schema's trainer section, against which set fields are told apart."""
    for key, (name, registry) in _registered(recipe).items():
        if name not in registry:
            raise RecipeError(f"{origin}: {key}: {registry.unknown_message(name)}")
    problems = (_exclusive(recipe) + _search(recipe) + _data_free_start(recipe.task_vectors.start)
                + _unhonoured(recipe, trainer_defaults))
    if problems:
        raise RecipeError(f"{origin}: {problems[0]}")
