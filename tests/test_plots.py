"""The pictures show the numbers they claim to: captured before saving, their data is compared
with the coefficients, the metrics log and the results they were drawn from."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from adamerge.app import plots
from adamerge.core.coefficients import MergeCoefficients
from adamerge.core.layouts import build_layout


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions save (they close them right after)."""
    figures = []
    save = plots._save

    def keep(figure, path):
        figures.append(figure)
        return save(figure, path)

    monkeypatch.setattr(plots, "_save", keep)
    monkeypatch.setattr(plots.plt, "close", lambda figure: None)
    return figures


def test_heatmap_rows_are_slots_columns_are_experts_values_are_the_coefficients(tmp_path, drawn):
    layout = build_layout(["a", "b", "c"], {"w1": (4, 2), "w2": (3,)}, "layer")
    coefficients = MergeCoefficients(layout, init=torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]))
    path = plots.coefficient_heatmap(coefficients, tmp_path / "c.png")
    assert path.is_file() and path.stat().st_size > 0
    axes = drawn[0].axes[0]
    np.testing.assert_allclose(axes.images[0].get_array(), [[0.1, 0.3, 0.5], [0.2, 0.4, 0.6]], rtol=1e-6)
    assert [t.get_text() for t in axes.get_xticklabels()] == ["a", "b", "c"]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["w1", "w2"]


def test_accuracy_bars_are_percentages_with_the_average_last(tmp_path, drawn):
    results = {"TA": {"x": {"accuracy": 0.5}, "y": {"accuracy": 0.7}}, "ours": {"x": {"accuracy": 0.9}}}
    plots.accuracy_bars(results, tmp_path / "a.png")
    axes = drawn[0].axes[0]
    heights = [[bar.get_height() for bar in container] for container in axes.containers]
    np.testing.assert_allclose(heights[0], [50.0, 70.0, 60.0])
    assert heights[1][0] == pytest.approx(90.0) and np.isnan(heights[1][1]) and heights[1][2] == pytest.approx(90.0)
    assert [t.get_text() for t in axes.get_xticklabels()] == ["x", "y", "average"]


def test_training_curves_plot_each_loss_column_against_its_steps(tmp_path, drawn):
    log = tmp_path / "metrics.csv"
    with open(log, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["step", "train/loss", "train/x/loss", "train/x/kl"])
        writer.writeheader()
        writer.writerow({"step": 0, "train/loss": 2.0, "train/x/loss": 1.5, "train/x/kl": 9})
        writer.writerow({"step": 10, "train/loss": 1.0, "train/x/loss": "", "train/x/kl": 9})
    plots.training_curves(log, tmp_path / "t.png")
    lines = {line.get_label(): line for line in drawn[0].axes[0].get_lines()}
    assert set(lines) == {"loss", "x/loss"}  # only the losses, not other logged values
    np.testing.assert_allclose(lines["loss"].get_xydata(), [[0, 2.0], [10, 1.0]])
    np.testing.assert_allclose(lines["x/loss"].get_xydata(), [[0, 1.5]])


def test_no_loss_columns_draw_nothing(tmp_path):
    (tmp_path / "m.csv").write_text("step,epoch\n0,0\n")
    assert plots.training_curves(tmp_path / "m.csv", tmp_path / "t.png") is None
    assert not (tmp_path / "t.png").exists()
