"""Problem kinds (adamerge.app.problems): the registry and dotted paths, which builders stream, and
a missing or unreadable pretrained model named in one line (status 2) for every Hugging Face kind.
Each kind's own module is tested in its file (test_sequence_classification, test_clip,
test_causal_lm, test_problems_digits); MergeProblem and the base exporter in test_problem."""

from __future__ import annotations

import json
import os

import pytest
import torch
from omegaconf import OmegaConf

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from adamerge.app import cli  # noqa: E402
from adamerge.app.config import ProblemConfig  # noqa: E402
from adamerge.app.problems import PROBLEM_KINDS, build_problem, register_problem, streams  # noqa: E402
from adamerge.app.problems.problem import MergeProblem  # noqa: E402
from adamerge.core.registry import UnknownNameError  # noqa: E402

BUILDERS = '''
import torch
from adamerge.app.problems.problem import MergeProblem


def whole(config):
    return MergeProblem(pretrained=torch.nn.Linear(2, 2), experts={}, tasks={}, calibration={})


def streamable(config, streamed=False):
    return MergeProblem(pretrained=torch.nn.Linear(2, 2), experts={}, tasks={}, calibration={},
                        description={"streamed": streamed})
'''


def test_the_built_in_kinds_are_registered_and_an_unknown_one_gets_the_closest():
    built_in = [kind for kind in PROBLEM_KINDS.names() if PROBLEM_KINDS.get(kind).__module__.startswith("adamerge.")]
    assert built_in == ["digits", "hf_causal_lm", "hf_clip", "hf_sequence_classification"]  # tests may register more
    assert [kind for kind in built_in if streams(PROBLEM_KINDS.get(kind))] == [
        "hf_causal_lm", "hf_sequence_classification"]
    with pytest.raises(UnknownNameError, match="unknown problem kind 'hf_casual_lm' \\(did you mean 'hf_causal_lm'\\?\\)"):
        build_problem(ProblemConfig(kind="hf_casual_lm"))


def test_a_dotted_path_builder_streams_when_it_takes_streamed(tmp_path, monkeypatch):
    (tmp_path / "my_kinds.py").write_text(BUILDERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert build_problem(ProblemConfig(kind="my_kinds:streamable"), streamed=True).description == {"streamed": True}
    assert build_problem(ProblemConfig(kind="my_kinds.streamable")).description == {"streamed": False}
    assert isinstance(build_problem(ProblemConfig(kind="my_kinds:whole")), MergeProblem)
    with pytest.raises(ValueError, match="problem kind 'my_kinds:whole' cannot be streamed; streamed kinds: "
                                         r"\['hf_causal_lm', 'hf_sequence_classification'\]"):
        build_problem(ProblemConfig(kind="my_kinds:whole"), streamed=True)
    with pytest.raises(UnknownNameError, match="cannot import problem kind 'my_kinds:nothing'"):
        build_problem(ProblemConfig(kind="my_kinds:nothing"))


def test_a_registered_kind_is_built_by_name():
    @register_problem("test_problems_kind")
    def build(config):
        return MergeProblem(pretrained=torch.nn.Linear(2, 2), experts={}, tasks={}, calibration={},
                            description={"seed": config.seed})

    assert build_problem(OmegaConf.structured(ProblemConfig(kind="test_problems_kind", seed=7))).description == {"seed": 7}


# ---------------------------------------------------------------------- the pretrained model

KINDS = {
    "hf_sequence_classification": {"a": {"expert": "experts/a"}},
    "hf_clip": {"a": {"expert": "experts/a", "classnames": ["cat", "dog"]}},
    "hf_causal_lm": {"a": {"expert": "experts/a", "text": "prompt"}},
}


def run_merge(tmp_path, kind: str, pretrained: str) -> int:
    recipe = {"name": "m", "output_dir": str(tmp_path / "runs"), "method": {"name": "task_arithmetic"},
              "problem": {"kind": kind, "pretrained": pretrained, "tasks": KINDS[kind]}}
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    return cli.main(["merge", str(path)])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_missing_pretrained_model_is_named_in_one_line(kind, tmp_path, capsys):
    pytest.importorskip("transformers")
    missing = tmp_path / "models" / "base"
    assert run_merge(tmp_path, kind, str(missing)) == 2
    assert capsys.readouterr().err == f"error: pretrained model {missing} does not exist\n"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_an_unreadable_pretrained_model_is_named_in_one_line(kind, tmp_path, capsys):
    pytest.importorskip("transformers")
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    assert run_merge(tmp_path, kind, str(folder)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: pretrained model {folder}: cannot read it: ") and err.count("\n") == 1, err
