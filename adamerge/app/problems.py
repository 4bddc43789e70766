"""Problem kinds: how a recipe's ``problem`` section becomes a :class:`MergeProblem`.

Built-in kinds: ``digits`` (the quickstart zoo), ``hf_sequence_classification``, ``hf_clip``
and ``hf_causal_lm`` (:mod:`adamerge.app.hf_problems`); any other kind is a dotted path to your
own builder ``fn(problem_config) -> MergeProblem`` (looked for in the working directory too), or
a name you registered with :func:`register_problem`. A builder that takes ``streamed`` can be
streamed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from omegaconf import OmegaConf

from adamerge.app import hf_problems
from adamerge.app.checks import check_name
from adamerge.app.config import ProblemConfig
from adamerge.app.problem import MergeProblem
from adamerge.core.registry import Registry

PROBLEM_BUILDERS: Registry[Callable[..., MergeProblem]] = Registry("problem kind", dotted_paths=True)
register_problem = PROBLEM_BUILDERS.register


def streams(builder: Callable[..., MergeProblem]) -> bool:
    """Whether a problem builder can build a streamed problem (it takes ``streamed``)."""
    return "streamed" in inspect.signature(builder).parameters


def build_problem(config: ProblemConfig, streamed: bool = False) -> MergeProblem:
    """Build the problem a recipe's ``problem`` section describes (a config node or a ProblemConfig).
    ``streamed``: the pretrained model as a skeleton on ``meta`` plus its lazily read checkpoint."""
    if OmegaConf.is_config(config):
        config = OmegaConf.to_object(config)
    kind = config.kind
    builder = PROBLEM_BUILDERS.get(kind)
    if streamed and not streams(builder):
        streamed_kinds = sorted(name for name, fn in PROBLEM_BUILDERS.items() if streams(fn))
        raise ValueError(f"problem kind {kind!r} cannot be streamed; streamed kinds: {streamed_kinds}")
    problem = builder(config, streamed=True) if streamed else builder(config)
    for what, names in (("task", problem.tasks), ("expert", problem.experts)):  # a builder's own names too
        for name in names:
            check_name(name, f"problem kind {kind!r}: {what}")
    return problem


# ---------------------------------------------------------------------- built-in zoo


@register_problem("digits")
def digits_problem(config: ProblemConfig) -> MergeProblem:
    """The quickstart zoo (``adamerge.zoo.digits``): an MLP on five input domains of scikit-learn's
    digits, one expert and head per domain; built on first use and cached. ``problem.options``
    are zoo settings (e.g. ``tasks``, ``hidden``)."""
    from adamerge.tasks.base import HeadTask
    from adamerge.zoo.digits import build_digits_zoo

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
        description={
            "kind": "digits",
            "base": str(zoo.pretrained_file),
            "experts": {name: str(zoo.expert_files[name]) for name in names},
        },
    )


register_problem("hf_sequence_classification", hf_problems.sequence_classification_problem)
register_problem("hf_clip", hf_problems.clip_problem)
register_problem("hf_causal_lm", hf_problems.causal_lm_problem)
