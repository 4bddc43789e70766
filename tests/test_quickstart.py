"""The README's main command: the quickstart runs end to end and learned merging wins there."""

from __future__ import annotations

from pathlib import Path

import pytest

from adamerge.app.cli import main
from adamerge.app.export import results_table
from adamerge.learning.evaluation import average_accuracy


@pytest.fixture(scope="module")
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


def readme_table() -> str:
    """The quickstart table as the README shows it: its lines from the header row to the first non-row."""
    lines = (Path(__file__).resolve().parent.parent / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method | upright"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return "\n".join(lines[start:end])


def test_the_readme_shows_exactly_what_the_quickstart_prints(quickstart):
    """With the pinned versions (constraints.txt) the digits zoo and every run are reproducible:
    the README's table is the quickstart's own output, digit for digit."""
    _, results = quickstart
    assert results_table(results).strip() == readme_table()


def test_cli_runs_a_built_in_quickstart_recipe(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADAMERGE_CACHE", str(tmp_path / "cache"))
    code = main(["merge", "quickstart/task_arithmetic", f"output_dir={tmp_path / 'ta'}"])
    assert code == 0 and (tmp_path / "ta" / "merged" / "model.safetensors").is_file()
    assert "quickstart-task-arithmetic" in capsys.readouterr().out
