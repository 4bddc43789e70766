"""The ``digits`` kind (adamerge.app.problems.digits): the quickstart zoo as a merge problem, its
merged model written by the base exporter, and a damaged cache built again rather than reported
(so its pretrained model is never missing)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("datasets")

from adamerge.app.config import ProblemConfig, TaskConfig  # noqa: E402
from adamerge.app.problems import build_problem  # noqa: E402
from adamerge.app.problems.problem import Exporter  # noqa: E402
from adamerge.io.checkpoints import open_weights  # noqa: E402
from adamerge.tasks.base import HeadTask  # noqa: E402
from adamerge.zoo.digits import DEFAULT_TASKS  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("digits")


def test_the_zoo_becomes_a_problem_with_its_files_and_a_plain_export(cache, tmp_path):
    problem = build_problem(ProblemConfig(kind="digits", cache_dir=str(cache)))
    assert list(problem.tasks) == list(DEFAULT_TASKS) and all(isinstance(t, HeadTask) for t in problem.tasks.values())
    assert problem.experts == {name: cache / f"expert_{name}.safetensors" for name in DEFAULT_TASKS}
    assert problem.description == {"kind": "digits", "base": str(cache / "pretrained.safetensors"),
                                   "experts": {name: str(path) for name, path in problem.experts.items()}}
    assert set(problem.calibration) == set(problem.evaluation) == set(problem.validation) == set(DEFAULT_TASKS)
    assert torch.equal(problem.validation["upright"][:]["pixels"], problem.calibration["upright"][:]["pixels"])
    assert "label" in problem.validation["upright"].column_names
    assert "label" not in problem.calibration["upright"].column_names and "label" in problem.evaluation["upright"].column_names
    assert type(problem.exporter) is Exporter  # a plain module: its weights, no config or tokenizer
    problem.exporter.export(problem.pretrained, tmp_path / "merged", 10**9)
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == ["model.safetensors"]
    written = open_weights(str(tmp_path / "merged"))
    assert all(torch.equal(written[k], v) for k, v in problem.pretrained.state_dict().items())


def test_problem_tasks_may_only_name_the_zoos_tasks(cache):
    config = ProblemConfig(kind="digits", cache_dir=str(cache), tasks={"upright": TaskConfig(), "sideways": TaskConfig()})
    with pytest.raises(KeyError, match=r"unknown digits task\(s\) \['sideways'\]"):
        build_problem(config)


def test_a_damaged_cache_is_built_again(cache):
    before = build_problem(ProblemConfig(kind="digits", cache_dir=str(cache))).pretrained.state_dict()
    (cache / "pretrained.safetensors").write_bytes(b"not safetensors")
    after = build_problem(ProblemConfig(kind="digits", cache_dir=str(cache))).pretrained.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert open_weights(str(cache / "pretrained.safetensors"))  # readable again
