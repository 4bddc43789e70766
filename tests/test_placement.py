"""Where a job's tensors go (adamerge.learning.placement): one resolution from the recipe's
``trainer`` section, and ``accelerator: gpu`` on a machine without one refused in one line,
before any model loads, for every job."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from adamerge.learning.placement import NoAcceleratorError, resolve_placement

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")


def trainer(**fields):
    return SimpleNamespace(**{"accelerator": "auto", "devices": 1, "precision": "32-true", "tf32": True, **fields})


@no_gpu
def test_auto_and_cpu_resolve_to_the_cpu_here():
    for accelerator in ("auto", "cpu"):
        placement = resolve_placement(trainer(accelerator=accelerator))
        assert placement.device == torch.device("cpu") and not placement.on_gpu


@no_gpu
@pytest.mark.parametrize("accelerator", ["gpu", "cuda", "GPU"])
def test_a_gpu_asked_for_on_a_machine_without_one_is_one_line(accelerator):
    with pytest.raises(NoAcceleratorError) as caught:
        resolve_placement(trainer(accelerator=accelerator))
    message = str(caught.value)
    assert message.startswith(f"trainer.accelerator is {accelerator!r} but torch sees no GPU") and "\n" not in message


def test_an_unknown_accelerator_is_named():
    with pytest.raises(NoAcceleratorError, match="trainer.accelerator is 'tpu'; use auto, cpu or gpu"):
        resolve_placement(trainer(accelerator="tpu"))


@no_gpu
@pytest.mark.parametrize("job, recipe", [
    ("fit", {"problem": {"kind": "digits"}}),
    ("fit", {"problem": {"kind": "digits"}, "objectives": [], "progressive": {"epochs": 1}}),
    ("fit", {"problem": {"kind": "digits"}, "frank_wolfe": {"iterations": 1}}),
    ("merge", {"problem": {"kind": "digits"}, "method": {"name": "task_arithmetic"}}),
    ("eval", {"problem": {"kind": "digits"}, "method": {"name": "task_arithmetic"}}),
])
def test_every_job_refuses_a_missing_gpu_in_one_line_before_any_model_loads(job, recipe, tmp_path, monkeypatch, capsys):
    from omegaconf import OmegaConf

    from adamerge.app import runner
    from adamerge.app.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(runner, "build_problem", no_model)
    recipe = {**recipe, "output_dir": str(tmp_path / "run"), "trainer": {"accelerator": "gpu"}}
    if job == "eval":  # a finished run whose recipe asks for a GPU
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "recipe.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(recipe)))
        arguments = ["eval", str(tmp_path / "run")]
    else:
        (tmp_path / "recipe.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(recipe)))
        arguments = [job, str(tmp_path / "recipe.yaml")]
    status = main(arguments)  # no model loaded (no_model), so it costs the imports and the recipe's load
    error = capsys.readouterr().err.strip()
    assert status == 2
    assert error.startswith("error: trainer.accelerator is 'gpu' but torch sees no GPU") and "\n" not in error
