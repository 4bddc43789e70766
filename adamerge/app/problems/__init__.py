"""Problem kinds: how a recipe's ``problem`` section becomes a
:class:`~adamerge.app.problems.problem.MergeProblem`, one module per built-in kind.

Built-in kinds: ``digits`` (the quickstart zoo), ``hf_sequence_classification``, ``hf_clip`` and
``hf_causal_lm``. Any other kind is a dotted path to your own builder
``fn(problem_config) -> MergeProblem`` (looked for in the working directory too), or a name you
registered with :func:`register_problem`. A builder that takes ``streamed`` can be streamed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from omegaconf import OmegaConf

from adamerge.app.checks import check_name
from adamerge.app.config import ProblemConfig
from adamerge.app.problems.causal_lm import causal_lm_problem
from adamerge.app.problems.clip import clip_problem
from adamerge.app.problems.digits import digits_problem
from adamerge.app.problems.problem import MergeProblem
from adamerge.app.problems.sequence_classification import sequence_classification_problem
from adamerge.core.registry import Registry

Builder = Callable[..., MergeProblem]  # (problem config[, streamed]) -> MergeProblem
PROBLEM_KINDS: Registry[Builder] = Registry("problem kind", dotted_paths=True)


def register_problem(kind: str) -> Callable[[Builder], Builder]:
    """``@register_problem("my_kind")`` on a builder makes ``problem.kind: my_kind`` build with it."""
    return PROBLEM_KINDS.register(kind)


def streams(builder: Builder) -> bool:
    """Whether a builder can build a streamed problem: it takes ``streamed``."""
    return "streamed" in inspect.signature(builder).parameters


def build_problem(config: ProblemConfig, streamed: bool = False) -> MergeProblem:
    """Build the problem a recipe's ``problem`` section describes (a config node or a ProblemConfig).
    ``streamed``: the pretrained model as a skeleton on ``meta`` plus its lazily read checkpoint."""
    if OmegaConf.is_config(config):
        config = OmegaConf.to_object(config)
    builder = PROBLEM_KINDS.get(config.kind)
    if streamed and not streams(builder):
        streamed_kinds = sorted(name for name, fn in PROBLEM_KINDS.items() if streams(fn))
        raise ValueError(f"problem kind {config.kind!r} cannot be streamed; streamed kinds: {streamed_kinds}")
    problem = builder(config, streamed=True) if streamed else builder(config)
    for what, names in (("task", problem.tasks), ("expert", problem.experts)):  # a builder's own names too
        for name in names:
            check_name(name, f"problem kind {config.kind!r}: {what}")
    return problem


register_problem("digits")(digits_problem)
register_problem("hf_sequence_classification")(sequence_classification_problem)
register_problem("hf_clip")(clip_problem)
register_problem("hf_causal_lm")(causal_lm_problem)
