"""The method table between adamerge and mergekit: every merge the writer emits is read back to the
same adamerge method and arguments, its defaults are the methods' own, and what has no mergekit
equal is refused saying why."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from adamerge.app.mergekit.methods import (
    ADAMERGE_ARGS,
    MERGEKIT_PARAMETERS,
    PAIRS,
    NoMergekit,
    Resolved,
    coefficients,
    from_mergekit,
    to_mergekit,
)

NUMELS = {"layers.0.w": 100, "layers.1.w": 100, "head.w": 40}  # sizes where int(d·n) == ceil(d·n) for d below
WRITTEN = [  # (adamerge method, args, experts): every pair of the table, with and without defaults
    ("average", {}, 3),
    ("task_arithmetic", {"scaling": [0.2, 0.5]}, 2),
    ("task_arithmetic", {"scaling": [0.3, 0.3, 0.3]}, 3),
    ("ties", {"density": 0.5, "scaling": 0.8, "trim_scope": "tensor"}, 2),
    ("ties", {"density": 0.25, "scaling": 1.5, "trim_scope": "tensor", "sign_method": "sum"}, 3),
    ("dare", {"density": 0.6, "scaling": 0.4}, 2),
    ("dare", {}, 2),
    ("dare", {"density": 0.5, "scaling": 0.7, "sign_election": True}, 3),
]


def rounded(args: dict) -> dict:
    """Arguments with every number to 9 decimals (the reader computes them in float64)."""
    def one(value):
        if isinstance(value, (list, tuple)):
            return [one(v) for v in value]
        return round(float(value), 9) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    return {key: one(value) for key, value in args.items()}


def read_back(written, experts: int) -> tuple[str, dict]:
    """What the reader makes of a written merge, resolved as ``config.read_mergekit`` resolves one:
    mergekit's defaults under the written parameters, each model's weight on every merged tensor
    (for ``linear``, the base a member weighted 0 there), task-arithmetic coefficients per tensor."""
    parameters = {**MERGEKIT_PARAMETERS[written.method], **written.parameters}
    rows = list(written.weights) + ([0.0] if written.method == "linear" else [])
    weights = torch.tensor(rows, dtype=torch.float64)[:, None].repeat(1, len(NUMELS))
    values = coefficients(written.method, weights, parameters, "written")[:experts]
    density = torch.full_like(values, float(written.per_model.get("density", 1.0)))
    names = [f"e{k}" for k in range(experts)]
    return from_mergekit(Resolved("written", written.method, names, values, density, parameters, NUMELS))


@pytest.mark.parametrize("name, args, experts", WRITTEN)
def test_every_written_method_reads_back_to_the_same_method_and_arguments(name, args, experts):
    written = to_mergekit(name, args, experts, NUMELS)
    assert len(written.weights) == experts
    method, read = read_back(written, experts)
    assert method == name
    assert rounded({**ADAMERGE_ARGS[name], **read}) == rounded({**ADAMERGE_ARGS[name], **args})


def test_a_single_scaling_is_read_back_as_one_per_expert():
    method, read = read_back(to_mergekit("task_arithmetic", {"scaling": 0.4}, 2, NUMELS), 2)
    assert (method, read) == ("task_arithmetic", {"scaling": [pytest.approx(0.4), pytest.approx(0.4)]})


def test_every_pair_is_written_and_read():
    """No pair of the table is unreachable from either side."""
    written = {to_mergekit(name, args, experts, NUMELS).method for name, args, experts in WRITTEN}
    assert written == {pair.mergekit for pair in PAIRS}
    assert {name for name, _, _ in WRITTEN} == set(ADAMERGE_ARGS)


@pytest.mark.parametrize("name", sorted(ADAMERGE_ARGS))
def test_the_tables_defaults_are_the_methods_own(name):
    method = getattr(importlib.import_module(f"adamerge.methods.{name}"), name)
    defaults = {p.name: p.default for p in inspect.signature(method).parameters.values()
                if p.default is not p.empty and p.name not in ("include", "exclude")}
    assert ADAMERGE_ARGS[name] == defaults


def test_a_written_ties_names_the_tensors_mergekit_trims_differently():
    note = to_mergekit("ties", {"density": 0.3, "trim_scope": "tensor"}, 2, {"a": 10, "b": 11}).note
    assert note.startswith("density 0.3: mergekit keeps int(density·n)") and "1 tensor(s)" in note and "(e.g. b)" in note
    assert to_mergekit("ties", {"density": 0.5, "trim_scope": "tensor"}, 2, {"a": 10}).note == ""


@pytest.mark.parametrize("name, args, reason", [
    ("ties", {}, "trim_scope 'model'"),
    ("ties", {"trim_scope": "tensor", "sign_method": "mean"}, "not 'mean'"),
    ("tsv", {}, "`tsv` has no mergekit equivalent (mergekit.yaml is written for average, task_arithmetic, ties and dare)"),
])
def test_what_mergekit_cannot_merge_is_refused_saying_why(name, args, reason):
    with pytest.raises(NoMergekit) as error:
        to_mergekit(name, args, 2, NUMELS)
    assert reason in str(error.value)


def test_unequal_linear_weights_read_as_task_arithmetic_not_average():
    values = torch.tensor([[0.25, 0.25], [0.5, 0.5]], dtype=torch.float64)
    merge = Resolved("m.yml", "linear", ["a", "b"], values, torch.ones_like(values), {"normalize": True}, {})
    assert from_mergekit(merge) == ("task_arithmetic", {"scaling": [0.25, 0.5]})
