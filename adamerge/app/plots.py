"""Pictures people would rather look at than read: coefficients per layer and task, training curves."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from adamerge.core.coefficients import MergeCoefficients  # noqa: E402


def coefficient_heatmap(coefficients: MergeCoefficients, path: str | os.PathLike, title: str = "") -> Path:
    """Heat-map of coefficients: one row per slot (tensor, group or chunk), one column per expert
    (element-wise coefficients show each tensor's mean)."""
    layout = coefficients.layout
    with torch.no_grad():
        values = coefficients.summary().float().cpu().T.numpy()  # [slots, experts]
    names = [_short(n) for n in layout.slot_names]
    height = min(60.0, 1.5 + 0.18 * len(names))
    width = 3.0 + 0.9 * layout.num_experts + 0.06 * max(len(n) for n in names)
    figure, axes = plt.subplots(figsize=(width, height))
    image = axes.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_xticks(range(layout.num_experts), labels=list(layout.expert_names), rotation=45, ha="right")
    step = max(1, math.ceil(len(names) / 300))
    axes.set_yticks(range(0, len(names), step), labels=names[::step], fontsize=6 if len(names) > 40 else 8)
    axes.set_xlabel("expert")
    axes.set_ylabel(f"{layout.granularity} coefficient slot")
    axes.set_title(title or f"merge coefficients ({layout.granularity}-wise)")
    figure.colorbar(image, ax=axes, fraction=0.04)
    figure.tight_layout()
    return _save(figure, path)


def training_curves(metrics_csv: str | os.PathLike, path: str | os.PathLike) -> Path | None:
    """Training loss (total and per task) against step, from Lightning's CSV log."""
    rows = list(csv.DictReader(open(metrics_csv))) if Path(metrics_csv).exists() else []
    columns = [c for c in (rows[0].keys() if rows else []) if c.startswith("train/") and c.endswith("loss")]
    if not columns:
        return None
    figure, axes = plt.subplots(figsize=(7, 4))
    for column in sorted(columns, key=lambda c: (c != "train/loss", c)):
        points = [(int(r["step"]), float(r[column])) for r in rows if r.get(column)]
        if points:
            steps, values = zip(*points)
            axes.plot(steps, values, label=column.removeprefix("train/"), linewidth=2 if column == "train/loss" else 1)
    axes.set_xlabel("step")
    axes.set_ylabel("objective")
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def _short(name: str, limit: int = 60) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def _save(figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    os.replace(tmp, path)
    return path


def accuracy_bars(results: dict[str, dict[str, dict]], path: str | os.PathLike, title: str = "") -> Path:
    """Grouped bars: accuracy per task (groups) for every method (bars), plus the average."""
    methods = list(results)
    tasks = list(dict.fromkeys(t for per_task in results.values() for t in per_task))
    groups = tasks + ["average"]
    figure, axes = plt.subplots(figsize=(3.5 + 0.28 * len(groups) * max(1, len(methods)), 4))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        values = [100 * results[method].get(t, {}).get("accuracy", float("nan")) for t in tasks]
        known = [v for v in values if v == v]
        values.append(sum(known) / len(known) if known else float("nan"))
        axes.bar([g + i * width for g in range(len(groups))], values, width, label=method)
    axes.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], labels=groups)
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 100)
    axes.set_title(title)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)
