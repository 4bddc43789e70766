"""CMA-ES over merge coefficients (``optimizer: {name: cmaes}``): a derivative-free search, for a
score without a gradient (accuracy on labelled validation rows) or one whose gradient misleads.

The search space is the trainable slots of a coefficient layout (task-, layer-, group- or
chunk-wise; at most :data:`MAX_DIMENSIONS`, as CMA-ES learns a full covariance): their raw
values, so a sigmoid constraint is searched in its logits, and every candidate is scored at its
effective values (a clamp's clamped ones; the result is projected into its bounds). The mean
starts at the coefficients' init. Every candidate is merged once and scored on
the same batches, read once and held on the device for the whole search, with the run's task
loss (task weights and balance; the objective's coefficient penalty added), under ``no_grad``.
The best candidate seen is the result.

The optimiser is the ``cmaes`` package's :class:`cmaes.CMA`, deterministic given its seed, so the
checkpoint needs no pickle: it is every finished generation's scores (safetensors, float64), and
a resumed search replays ``ask``/``tell`` with them, then goes on. It ends bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from cmaes import CMA
from lightning.fabric.utilities.apply_func import move_data_to_device
from safetensors import safe_open

from adamerge.core.coefficients import MergeCoefficients
from adamerge.core.merged import MergedModel
from adamerge.io.checkpoints import UnreadableInput, reading, save_safetensors
from adamerge.io.terminal import progress_bar
from adamerge.learning.loss import TaskLoss
from adamerge.objectives import split_loss

MAX_DIMENSIONS = 1000
"""The most coefficients CMA-ES searches: it adapts a full ``n × n`` covariance from a few
candidates per generation, so beyond this it needs more generations than a search can afford."""

FORMAT = "adamerge.cmaes"


@dataclass(frozen=True)
class CMAESOptions:
    """``optimizer.args`` of ``optimizer.name: cmaes``."""

    popsize: int | None = None  # candidates per generation (default: the package's 4 + ⌊3 ln n⌋)
    sigma0: float = 0.1  # the initial step size, in raw coefficient units
    generations: int = 20


def option_problems(args: Mapping) -> list[str]:
    """One line per bad ``optimizer.args`` entry, naming it."""
    known = [f.name for f in fields(CMAESOptions)]
    problems = [f"optimizer.args.{name} is not a CMA-ES argument; use {known}" for name in args if name not in known]
    checks = {
        "popsize": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
        "sigma0": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf, "a number > 0"),
        "generations": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    }
    for name, (valid, what) in checks.items():
        if name in args and args[name] is not None and not valid(args[name]):
            problems.append(f"optimizer.args.{name} is {args[name]!r}; use {what}")
    return problems


def cmaes_options(args: Mapping) -> CMAESOptions:
    problems = option_problems(args)
    if problems:
        raise ValueError(problems[0])
    return CMAESOptions(**args)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------- the score


@dataclass
class Scorer:
    """The score of the merged model's current coefficients (lower is better): each task's loss
    under the run's objective, averaged over its ``batches`` by rows, then weighted and balanced as
    every learner's :class:`TaskLoss`, plus the objective's penalty on the coefficients."""

    merged: MergedModel
    loss: TaskLoss
    batches: Mapping[str, Sequence[dict]]
    device: torch.device
    _on_device: dict[str, list[dict]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self._on_device = {name: [move_data_to_device(b, self.device) for b in rows] for name, rows in self.batches.items()}
        if self.loss.balance.needs_start and self.loss.initial is None:
            self.loss.initial = self.task_losses()  # the balances' start: the losses at the current (initial) coefficients

    @torch.no_grad()
    def task_losses(self) -> dict[str, float]:
        objective, params = self.loss.objective, self.merged.merged_parameters()
        losses = {}
        for name, batches in self._on_device.items():
            total, rows = 0.0, 0
            for batch in batches:
                output = self.loss.tasks[name](self.merged, params, batch, objective.hidden_layers)
                count = len(batch["index"])
                total += float(split_loss(objective(output, batch, name))[0]) * count
                rows += count
            losses[name] = total / rows
        return losses

    @torch.no_grad()
    def __call__(self) -> float:
        losses = self.task_losses()
        score = sum(self.loss.weights[n] * float(self.loss.balanced(torch.tensor(v), n)) for n, v in losses.items())
        penalty = self.loss.objective.penalty(self.merged)
        return score + (float(penalty) if penalty is not None else 0.0)


# ---------------------------------------------------------------------- the search


@dataclass
class SearchResult:
    """The best score found, where (``generation``, ``candidate``), one log row per generation run
    (fewer than asked when CMA-ES converged first), the population size and the dimensions searched."""

    best: float
    generation: int
    candidate: int
    log: list[dict]
    popsize: int
    dimensions: int

    def summary(self) -> dict:
        return {"best_score": self.best, "best_generation": self.generation, "best_candidate": self.candidate,
                "generations_run": len(self.log), "popsize": self.popsize, "dimensions": self.dimensions}


def search_space(coefficients: MergeCoefficients, label: str = "coefficients.granularity") -> np.ndarray:
    """The initial mean: the trainable slots' raw values (float64); more than :data:`MAX_DIMENSIONS`
    is refused naming ``label``."""
    if not isinstance(coefficients, MergeCoefficients):
        raise ValueError(f"{label}: CMA-ES searches task-, layer-, group- or chunk-wise coefficients, not one per entry")
    mean = coefficients.raw.detach().double().cpu().flatten().numpy()
    if not 0 < mean.size <= MAX_DIMENSIONS:
        raise ValueError(f"{label} {coefficients.layout.granularity!r} gives {mean.size} trainable coefficients; CMA-ES "
                         f"searches 1 to {MAX_DIMENSIONS}: use a coarser granularity, fewer groups or chunks, or freeze some")
    return mean


def cmaes_search(
    coefficients: MergeCoefficients,
    score: Callable[[], float],
    options: CMAESOptions,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    progress: bool = True,
) -> SearchResult:
    """Minimise ``score()`` (of ``coefficients``' current values) over ``coefficients``' trainable
    slots for ``options.generations`` generations; ``coefficients`` end at the best candidate.

    ``checkpoint``: the generations' scores are saved there after each one, and read back first,
    so an interrupted search resumes where it stopped and ends exactly as an uninterrupted one."""
    mean = search_space(coefficients)
    optimizer = CMA(mean=mean, sigma=options.sigma0, seed=seed, population_size=options.popsize)
    popsize, raw = optimizer.population_size, coefficients.raw
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    history = _read_scores(checkpoint, popsize, mean.size)
    best, log = (math.inf, -1, -1, None), []
    with progress_bar(options.generations, "CMA-ES", unit="generation", enabled=progress) as bar:
        for generation in range(options.generations):
            candidates = [optimizer.ask() for _ in range(popsize)]
            if generation < len(history):  # replayed: scored before an interruption
                scores = history[generation]
            else:
                scores = [_score_at(raw, x, score) for x in candidates]
                history.append(scores)
                _save_scores(checkpoint, history, mean.size)
            optimizer.tell(list(zip(candidates, scores)))
            first = min(range(popsize), key=scores.__getitem__)
            if scores[first] < best[0]:
                best = (scores[first], generation, first, candidates[first])
            log.append({"step": generation, "train/loss": scores[first], "train/mean_loss": float(np.mean(scores)),
                        "train/best_loss": best[0]})
            bar.update(1)
            bar.set_postfix(best=f"{best[0]:.4g}", refresh=False)
            if optimizer.should_stop():  # converged by CMA-ES's own criteria (a flat score, a step size gone to zero)
                break
    if best[3] is not None:
        _set(raw, best[3])
        coefficients.project_()  # a clamp's raw values into its bounds: the effective values scored stay
    return SearchResult(best[0], best[1], best[2], log, popsize, mean.size)


def _set(raw: torch.Tensor, x: np.ndarray) -> None:
    with torch.no_grad():
        raw.copy_(torch.from_numpy(x).view(raw.shape))


def _score_at(raw: torch.Tensor, x: np.ndarray, score: Callable[[], float]) -> float:
    _set(raw, x)
    value = float(score())
    if math.isnan(value):
        raise ValueError("the objective is NaN for a candidate; CMA-ES needs a number for every one")
    return value


def _save_scores(checkpoint: Path | None, history: list[list[float]], dimensions: int) -> None:
    if checkpoint is not None:
        save_safetensors({"scores": torch.tensor(history, dtype=torch.float64)}, checkpoint,
                         metadata={"format": FORMAT, "dimensions": str(dimensions)})


def _read_scores(checkpoint: Path | None, popsize: int, dimensions: int) -> list[list[float]]:
    """The scores of the generations an interrupted search finished (none without a checkpoint)."""
    if checkpoint is None or not checkpoint.exists():
        return []
    with reading("checkpoint", checkpoint), safe_open(str(checkpoint), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise UnreadableInput(f"checkpoint {checkpoint} is not a CMA-ES checkpoint: delete it to start over")
        scores = handle.get_tensor("scores")
    if int(metadata.get("dimensions", -1)) != dimensions or scores.ndim != 2 or scores.shape[1] != popsize:
        raise ValueError(f"checkpoint {checkpoint} was written for another search space or popsize: delete it to start over")
    return scores.tolist()
