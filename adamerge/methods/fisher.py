"""Fisher merging: each entry the experts' average weighted by their diagonal Fisher information.

Matena & Raffel, NeurIPS 2022, "Merging Models with Fisher-Weighted Averaging" (arXiv 2111.09832):

    θ = Σ_k λ_k F̂_k θ_k / Σ_k λ_k F̂_k    (per entry),    F̂_k = max(F_k / ‖F_k‖₂, floor)

computed here in task-vector form, ``θ_0 + Σ_k λ_k F̂_k τ_k / Σ_k λ_k F̂_k`` (the weights of each
entry sum to one, so the forms agree). ``F_k`` is expert ``k``'s diagonal Fisher on ``batches``
(default 4) unlabelled calibration batches of its own task, each sample's squared gradient
averaged over the samples:

    F_k = mean_x (∂ log p(ŷ | x; θ_k) / ∂θ)²,    ŷ = argmax of the expert's own logits

(a language model's sample: the sum of ``log p`` over its predicted tokens). The paper's reference
code takes the exact expectation over the model's predictive distribution,
``Σ_y p(y|x) (∂ log p(y|x)/∂θ)²``, which costs one backward pass per class; this is its
predicted-label (argmax) approximation, one backward pass per sample for any number of classes or
vocabulary size.

Normalisation (``normalize``, default on, as the paper's ``normalize_fishers``): each expert's
Fisher is divided by its L2 norm over the whole merge scope, so an expert with larger gradients
overall does not dominate. ``floor`` (the paper's ``fisher_floor``, 1e-6) is applied to every
expert's normalised Fisher (the paper's code floors the first model's raw Fisher by default), so
an entry with no Fisher in any expert gets the ``λ``-weighted mean, the plain mean with equal
``λ``. ``coefficients`` are the ``λ_k`` (one value: equal weights, the paper's default). Tensors
of the scope that get no gradient (buffers of a state dict) fall back the same way. Memory: one
expert's weights and Fisher and the two running sums; never ``K`` experts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from adamerge.core.scope import Experts, Patterns
from adamerge.io.checkpoints import WeightsSource
from adamerge.methods.base import METHODS, MergeResult, apply_deltas
from adamerge.methods.calibration import Calibration, data_driven, rows
from adamerge.methods.experts import ExpertReader


def diagonal_fisher(calibration: Calibration, task: str, weights: dict[str, Tensor], batches: int) -> dict[str, Tensor]:
    """``key → mean_x (∂ log p(ŷ|x)/∂θ)²`` over ``weights`` (the tensors it is taken for, swapped into the
    backbone) on ``task``'s first ``batches`` calibration batches, sample by sample."""
    leaves = {key: value.to(calibration.device).detach().requires_grad_(True) for key, value in weights.items()}
    params = calibration.params(leaves)
    fisher = {key: torch.zeros_like(leaf, dtype=torch.float32) for key, leaf in leaves.items()}
    samples = 0
    for batch in calibration.inputs(task, batches):
        for row in rows(batch):
            logits = calibration.logits(task, params, row).float()
            log_p = torch.log_softmax(logits, dim=-1).max(dim=-1).values.sum()  # log p of each row's argmax
            grads = torch.autograd.grad(log_p, list(leaves.values()), allow_unused=True)
            for key, grad in zip(leaves, grads):
                if grad is not None:
                    fisher[key] += grad.float().square()
            samples += 1
    return {key: value / samples for key, value in fisher.items()}


def _coefficients(coefficients: float | Sequence[float], count: int) -> list[float]:
    if isinstance(coefficients, (int, float)):
        coefficients = [coefficients] * count
    values = [float(c) for c in coefficients]
    if len(values) != count:
        raise ValueError(f"fisher: coefficients has {len(values)} values but there are {count} experts")
    if min(values) <= 0:
        raise ValueError(f"fisher: coefficients must be > 0, got {values}")
    return values


class FisherSums:
    """Per key, ``Σ_k λ_k F̂_k τ_k`` and ``Σ_k λ_k F̂_k`` (``F̂_k = max(F_k / ‖F_k‖₂, floor)``, the norm
    over every key when ``normalize``), added one expert at a time."""

    def __init__(self, normalize: bool = True, floor: float = 1e-6):
        if floor <= 0:
            raise ValueError(f"fisher: floor must be > 0, got {floor}")
        self.normalize, self.floor = normalize, floor
        self.numerator: dict[str, Tensor] = {}
        self.denominator: dict[str, Tensor] = {}

    def add(self, info: dict[str, Tensor], taus: dict[str, Tensor], coefficient: float = 1.0) -> None:
        """One expert: its Fisher ``info`` and task vectors ``taus`` (the same keys), weighted by ``coefficient``."""
        norm = float(torch.sqrt(sum(f.double().square().sum() for f in info.values()))) if self.normalize else 1.0
        for key, tau in taus.items():
            weight = coefficient * (info[key] / (norm or 1.0)).clamp(min=self.floor)
            self.numerator[key] = self.numerator[key] + weight * tau if key in self.numerator else weight * tau
            self.denominator[key] = self.denominator[key] + weight if key in self.denominator else weight

    def deltas(self) -> dict[str, Tensor]:
        """The merged update of every key."""
        return {key: self.numerator[key] / self.denominator[key] for key in self.numerator}


@METHODS.register("fisher")
@data_driven
def fisher(
    pretrained: WeightsSource,
    experts: Experts,
    *,
    calibration: Calibration,
    coefficients: float | Sequence[float] = 1.0,
    normalize: bool = True,
    floor: float = 1e-6,
    batches: int = 4,
    include: Patterns = None,
    exclude: Patterns = None,
) -> MergeResult:
    """Fisher merging: ``θ_0 + Σ_k λ_k F̂_k τ_k / Σ_k λ_k F̂_k`` per entry, ``F̂_k`` expert ``k``'s
    normalised, floored diagonal Fisher on its own task's calibration inputs."""
    sums = FisherSums(normalize, floor)
    reader = ExpertReader(pretrained, experts, include, exclude)
    calibration.check(reader.names, "fisher")
    for coefficient, name in zip(_coefficients(coefficients, len(reader.names)), reader.names):
        taus = {key: tau.to(calibration.device) for key, tau in reader.task_vectors(name)}
        weights = {key: (reader.base[key].to(calibration.device, torch.float32) + tau).to(reader.base[key].dtype)
                   for key, tau in taus.items()}
        sums.add(diagonal_fisher(calibration, name, weights, batches), taus, coefficient)
    return apply_deltas(pretrained, sums.deltas())
