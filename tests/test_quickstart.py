"""The README's main command: the quickstart runs end to end and learned merging wins there."""

from __future__ import annotations

import pytest

from adamerge.app.cli import main
from adamerge.learning.evaluate import average_accuracy


@pytest.fixture
def quickstart(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("runs") / "quickstart"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ADAMERGE_CACHE", str(cache))
        from adamerge.app.quickstart import run_quickstart

        yield out, run_quickstart(out)


def test_layerwise_adamerging_beats_task_arithmetic(quickstart):
    out, results = quickstart
    average = {method: average_accuracy(per_task) for method, per_task in results.items()}
    assert set(average) == {
        "experts", "pretrained", "task arithmetic (0.3)", "TIES", "AdaMerging task-wise", "AdaMerging layer-wise"
    }
    assert average["AdaMerging layer-wise"] > average["task arithmetic (0.3)"] + 0.05
    assert average["AdaMerging layer-wise"] > average["AdaMerging task-wise"]
    assert average["experts"] > average["AdaMerging layer-wise"] > average["pretrained"]
    # every run left a finished directory, and the summary and plot exist
    for run in ("task_arithmetic", "ties", "adamerging_taskwise", "adamerging_layerwise"):
        assert (out / run / "recipe.yaml").is_file() and (out / run / "eval.json").is_file()
    assert (out / "adamerging_layerwise" / "coefficients.png").is_file()
    assert (out / "summary.md").read_text().count("|") > 20 and (out / "accuracy.png").is_file()


def test_cli_runs_a_built_in_quickstart_recipe(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADAMERGE_CACHE", str(tmp_path / "cache"))
    code = main(["merge", "quickstart/task_arithmetic", f"output_dir={tmp_path / 'ta'}"])
    assert code == 0 and (tmp_path / "ta" / "merged" / "model.safetensors").is_file()
    assert "quickstart-task-arithmetic" in capsys.readouterr().out
