"""The one table between adamerge's data-free methods and mergekit's merge methods, read both
ways: a run's ``mergekit.yaml`` is written from it (:mod:`.write`) and a mergekit YAML is read
through it (:mod:`.config`, :mod:`.recipe`). Each pair states both sides' defaults, so the two
directions cannot drift apart; what has no equal on the other side is refused, saying why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from adamerge.core.tensor_ops import keep_count


class NoMergekit(Exception):
    """Why a merge has no mergekit config (a run says so in ``mergekit.txt``)."""


DARE_NOTE = (
    "DARE drops entries at random: mergekit draws its own masks (same density; survivors rescaled to keep "
    "each tensor's L1 norm, ≈ 1/density), so its merge equals this one in distribution, not tensor by tensor"
)
# the mergekit methods whose weights are task-arithmetic coefficients (a learned merge can start from them)
COEFFICIENT_METHODS = ("linear", "task_arithmetic")


def trim_note(density: float, numels: Mapping[str, int]) -> str:
    """Where mergekit's trim keeps ``int(density·n)`` entries (at least one) and adamerge's ``ceil(density·n)``."""
    differ = [k for k, n in numels.items() if max(1, int(density * n)) != keep_count(n, density)]
    if not differ:
        return ""
    return (f"density {density}: mergekit keeps int(density·n) entries of a tensor, adamerge ceil(density·n), so "
            f"{len(differ)} tensor(s) keep one entry fewer in mergekit and differ there (e.g. {differ[0]})")


@dataclass(frozen=True)
class MergekitMethod:
    """A data-free merge in mergekit's terms: its ``merge_method``, each expert's weight on every
    merged tensor, every model's other parameters, the top-level ``parameters``, and a note."""

    method: str
    weights: tuple[float, ...]
    per_model: dict
    parameters: dict
    note: str = ""


@dataclass(frozen=True)
class Resolved:
    """A mergekit merge resolved per tensor (:func:`.config.read_mergekit`): ``values[k, i]`` is expert
    k's task-arithmetic coefficient on tensor i for linear and task_arithmetic (:func:`coefficients`),
    its mergekit weight for ties and DARE; ``parameters``: the top-level ones, mergekit's defaults filled in."""

    where: str
    method: str
    experts: Sequence[str]
    values: torch.Tensor
    density: torch.Tensor
    parameters: Mapping
    numels: Mapping[str, int]


# ---------------------------------------------------------------------- adamerge -> mergekit


def _write_average(args: Mapping, experts: int, numels: Mapping[str, int]) -> MergekitMethod:
    return MergekitMethod("linear", (1.0,) * experts, {}, {"normalize": True})


def _write_task_arithmetic(args: Mapping, experts: int, numels: Mapping[str, int]) -> MergekitMethod:
    scaling = args["scaling"]
    weights = tuple(float(s) for s in scaling) if isinstance(scaling, (list, tuple)) else (float(scaling),) * experts
    return MergekitMethod("task_arithmetic", weights, {}, {"normalize": False})


def _write_ties(args: Mapping, experts: int, numels: Mapping[str, int]) -> MergekitMethod:
    if args["trim_scope"] != "tensor":
        raise NoMergekit(
            f"ties with trim_scope {args['trim_scope']!r} (one threshold per expert over the whole model) has no mergekit "
            "equivalent: mergekit trims each tensor (method.args.trim_scope: tensor)"
        )
    if args["sign_method"] != "sum":
        raise NoMergekit(f"mergekit's ties elects signs by total mass ('sum'), not {args['sign_method']!r}")
    note = trim_note(float(args["density"]), numels)
    return MergekitMethod("ties", (1.0,) * experts, {"density": args["density"]}, {"normalize": True, "lambda": args["scaling"]}, note)


def _write_dare_linear(args: Mapping, experts: int, numels: Mapping[str, int]) -> MergekitMethod:
    return MergekitMethod("dare_linear", (float(args["scaling"]),) * experts, {"density": args["density"]},
                          {"normalize": False}, DARE_NOTE)


def _write_dare_ties(args: Mapping, experts: int, numels: Mapping[str, int]) -> MergekitMethod:
    return MergekitMethod("dare_ties", (1.0,) * experts, {"density": args["density"]},
                          {"normalize": True, "lambda": args["scaling"]}, DARE_NOTE)


# ---------------------------------------------------------------------- mergekit -> adamerge


def _constant(merge: Resolved) -> list[float]:
    """Each expert's one coefficient, refused where it varies over tensors."""
    varying = [n for n, row in zip(merge.experts, merge.values) if (row - row[0]).abs().max() > 1e-12]
    if varying:
        raise ValueError(f"{merge.where}: the weight of {varying[0]} varies over tensors, and a data-free adamerge method "
                         "takes one per expert: start `adamerge fit --from-mergekit` from it instead")
    return [float(row[0]) for row in merge.values]


def _read_linear(merge: Resolved) -> tuple[str, dict]:
    scaling = _constant(merge)
    if scaling and all(abs(s - 1 / len(scaling)) <= 1e-12 for s in scaling):
        return "average", {}
    return "task_arithmetic", {"scaling": scaling}


def _read_task_arithmetic(merge: Resolved) -> tuple[str, dict]:
    return "task_arithmetic", {"scaling": _constant(merge)}


def _uniform(merge: Resolved) -> tuple[float, float, float]:
    """The one weight, density and lambda of a ties or DARE merge, refused where adamerge has no equal."""
    weight, density, lam = float(merge.values[0, 0]), float(merge.density[0, 0]), float(merge.parameters["lambda"])
    if (merge.values - weight).abs().max() > 1e-12 or weight <= 0:
        raise ValueError(f"{merge.where}: models[*].parameters.weight: adamerge's {merge.method} weighs every expert "
                         "equally: give all the same positive weight everywhere")
    if (merge.density - density).abs().max() > 1e-12:
        raise ValueError(f"{merge.where}: models[*].parameters.density: adamerge's {merge.method} takes one density")
    if merge.parameters["rescale"] != MERGEKIT_PARAMETERS[merge.method]["rescale"]:
        raise ValueError(f"{merge.where}: parameters.rescale: {merge.parameters['rescale']} has no adamerge equal for {merge.method}")
    return weight, density, lam


def _normalized(merge: Resolved) -> None:
    if not merge.parameters["normalize"]:
        raise ValueError(f"{merge.where}: parameters.normalize: false makes mergekit's {merge.method} add the agreeing "
                         "deltas undivided; adamerge's divides by their count (normalize: true with equal weights)")


def _read_ties(merge: Resolved) -> tuple[str, dict]:
    _, density, lam = _uniform(merge)
    _normalized(merge)
    differ = trim_note(density, merge.numels)
    if differ:
        raise ValueError(f"{merge.where}: models[*].parameters.density: {differ}")
    return "ties", {"density": density, "scaling": lam, "trim_scope": "tensor", "sign_method": "sum"}


def _read_dare_linear(merge: Resolved) -> tuple[str, dict]:
    weight, density, lam = _uniform(merge)
    scaling = lam / len(merge.experts) if merge.parameters["normalize"] else lam * weight  # λ Σ w τ / (K w or 1)
    return "dare", {"density": density, "scaling": scaling}


def _read_dare_ties(merge: Resolved) -> tuple[str, dict]:
    _, density, lam = _uniform(merge)
    _normalized(merge)
    return "dare", {"density": density, "scaling": lam, "sign_election": True}


# ---------------------------------------------------------------------- the table


@dataclass(frozen=True)
class MethodPair:
    """An adamerge method and the mergekit method that merges the same, each with its defaults
    (``args``: those of ``adamerge/methods/<name>.py``; ``parameters``: what mergekit's method reads);
    ``when``: the adamerge arguments that choose this pair where a method has several (DARE)."""

    adamerge: str
    args: Mapping
    mergekit: str
    parameters: Mapping
    write: Callable[[Mapping, int, Mapping[str, int]], MergekitMethod]
    read: Callable[[Resolved], tuple[str, dict]]
    when: Mapping = field(default_factory=dict)


def _task_arithmetic_family(normalize: bool, rescale: bool) -> dict:
    """mergekit 0.1.5's generalized task arithmetic parameters and defaults (``merge_methods/registry.py``)."""
    return {"normalize": normalize, "rescale": rescale, "lambda": 1.0, "int8_mask": False, "density": 1.0}


_DARE = {"density": 0.5, "scaling": 0.3, "seed": 0, "sign_election": False}
PAIRS = (
    MethodPair("average", {}, "linear", {"normalize": True}, _write_average, _read_linear),
    MethodPair("task_arithmetic", {"scaling": 0.3}, "task_arithmetic", _task_arithmetic_family(False, False),
               _write_task_arithmetic, _read_task_arithmetic),
    MethodPair("ties", {"density": 0.2, "scaling": 1.0, "trim_scope": "model", "sign_method": "sum"}, "ties",
               _task_arithmetic_family(True, False), _write_ties, _read_ties),
    MethodPair("dare", _DARE, "dare_linear", _task_arithmetic_family(False, True), _write_dare_linear, _read_dare_linear,
               {"sign_election": False}),
    MethodPair("dare", _DARE, "dare_ties", _task_arithmetic_family(False, True), _write_dare_ties, _read_dare_ties,
               {"sign_election": True}),
)
MERGEKIT_PARAMETERS = {pair.mergekit: pair.parameters for pair in PAIRS}
ADAMERGE_ARGS = {pair.adamerge: pair.args for pair in PAIRS}


def to_mergekit(name: str, args: Mapping, experts: int, numels: Mapping[str, int]) -> MergekitMethod:
    """The mergekit merge of adamerge's method ``name`` with ``args`` (its defaults filled in) over
    ``experts`` experts and the merged tensors' sizes, or :class:`NoMergekit` saying why there is none."""
    if name not in ADAMERGE_ARGS:
        names = list(ADAMERGE_ARGS)
        raise NoMergekit(f"`{name}` has no mergekit equivalent (mergekit.yaml is written for "
                         f"{', '.join(names[:-1])} and {names[-1]})")
    args = {**ADAMERGE_ARGS[name], **args}
    pair = next(p for p in PAIRS if p.adamerge == name and all(args[k] == v for k, v in p.when.items()))
    return pair.write(args, experts, numels)


def from_mergekit(merge: Resolved) -> tuple[str, dict]:
    """The adamerge method and arguments that merge what a resolved mergekit merge does, or a
    ``ValueError`` naming the key that has no equal."""
    return next(p for p in PAIRS if p.mergekit == merge.method).read(merge)


def coefficients(method: str, weights: torch.Tensor, parameters: Mapping, where: str) -> torch.Tensor:
    """Each input's task-arithmetic coefficient per tensor (linear, task_arithmetic; mergekit's
    ``generalized_task_arithmetic.py`` and ``linear.py``), or its weight as given (ties, DARE)."""
    total = weights.sum(dim=0)
    if method == "linear":  # Σ w_i θ_i / Σ w_i = θ_ref + Σ_i (w_i / Σ w) (θ_i − θ_ref) when the factors sum to 1
        if parameters["normalize"]:
            if (total == 0).any():
                raise ValueError(f"{where}: models[*].parameters.weight: the weights sum to 0 on some tensor")
            return weights / total
        if (total - 1).abs().max() > 1e-6:
            raise ValueError(f"{where}: parameters.normalize: false: linear's weights must then sum to 1 on every tensor "
                             "(adamerge merges differences from a base)")
        return weights
    if method == "task_arithmetic":
        divisor = torch.where(total.abs() < 1e-8, 1.0, total) if parameters["normalize"] else torch.ones_like(total)
        return parameters["lambda"] * weights / divisor
    return weights
