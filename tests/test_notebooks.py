"""Notebooks are executed, so they cannot rot."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
EXPECTED_OUTPUT = {
    "custom_objective": ["| reliable_entropy |", "| entropy |", "fraction of reliable samples"],
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAMERGE_CACHE", str(tmp_path / "cache"))
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    printed = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    for expected in EXPECTED_OUTPUT.get(path.stem, []):
        assert expected in printed


def test_the_custom_objective_fits_in_thirty_lines():
    notebook = nbformat.read(next(p for p in NOTEBOOKS if p.stem == "custom_objective"), as_version=4)
    definition = next(c.source for c in notebook.cells if "OBJECTIVES.register(" in c.source)
    assert len(definition.strip().splitlines()) <= 30
