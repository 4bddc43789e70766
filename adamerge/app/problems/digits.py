"""The ``digits`` kind: the quickstart zoo (:mod:`adamerge.zoo.digits`), an MLP on five input
domains of scikit-learn's digits, one expert and head per domain, built on first use and cached
(a damaged cache is built again, so its pretrained model is never missing); its validation rows
are the calibration images with their labels. Its merged model is a plain module, written by the
base :class:`~adamerge.app.problems.problem.Exporter`."""

from __future__ import annotations

from adamerge.app.config import ProblemConfig
from adamerge.app.problems.problem import MergeProblem


def digits_problem(config: ProblemConfig) -> MergeProblem:
    """``problem.options`` are zoo settings (e.g. ``tasks``, ``hidden``); ``problem.tasks`` may
    only name tasks of the zoo (their weights)."""
    from adamerge.tasks.base import HeadTask
    from adamerge.zoo.digits import build_digits_zoo

    if config.dtype != "auto":
        raise ValueError(f"problem.dtype is {config.dtype!r}: the digits zoo is float32 (problem.dtype is for Hugging Face kinds)")
    zoo = build_digits_zoo(cache_dir=config.cache_dir, seed=config.seed, **config.options)
    hidden = [f"norms.{i}" for i in range(len(zoo.settings.hidden))] + [f"layers.{len(zoo.settings.hidden)}"]
    names = list(zoo.tasks)
    unknown = sorted(set(config.tasks) - set(names))
    if unknown:
        raise KeyError(f"problem.tasks names unknown digits task(s) {unknown}; the zoo has {names}")
    return MergeProblem(
        pretrained=zoo.pretrained,
        experts={name: zoo.expert_files[name] for name in names},
        tasks={name: HeadTask(name, zoo.heads[name], input_key="pixels", hidden_modules=hidden) for name in names},
        calibration={name: zoo.dataset(name, "calibration").with_format("torch") for name in names},
        evaluation={name: zoo.dataset(name, "test").with_format("torch") for name in names},
        validation={name: zoo.dataset(name, "validation").with_format("torch") for name in names},
        description={
            "kind": "digits",
            "base": str(zoo.pretrained_file),
            "experts": {name: str(zoo.expert_files[name]) for name in names},
        },
    )
