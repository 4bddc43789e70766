"""The README's first command: build the digits zoo, merge it every way, print one table.

Baselines (each expert on its own task, the pretrained backbone with each task's head), two
data-free merges and AdaMerging task- and layer-wise, all from the built-in recipes in
``recipes/quickstart/``; every run keeps its own directory under ``out``.
"""

from __future__ import annotations

from pathlib import Path

from adamerge.app import runner
from adamerge.app.builders import build_data, build_merged, build_task_vectors
from adamerge.app.problems import build_problem
from adamerge.io.checkpoints import write_text
from adamerge.app.config import load_recipe, resolve_recipe
from adamerge.app.export import results_table
from adamerge.app.plots import accuracy_bars

RECIPES = {
    "task arithmetic (0.3)": ("merge", "quickstart/task_arithmetic"),
    "TIES": ("merge", "quickstart/ties"),
    "AdaMerging task-wise": ("fit", "quickstart/adamerging_taskwise"),
    "AdaMerging layer-wise": ("fit", "quickstart/adamerging_layerwise"),
}


def run_quickstart(out: Path = Path("runs/quickstart")) -> dict[str, dict]:
    """Run every quickstart recipe into ``out`` and return ``method -> task -> metrics``."""
    out = Path(out)
    print("Building the digits zoo (cached after the first run) and evaluating the baselines ...")
    first = load_recipe(resolve_recipe(RECIPES["task arithmetic (0.3)"][1]))
    runner.setup_process(first)
    problem = build_problem(first.problem)
    merged = build_merged(first, problem, build_task_vectors(first, problem))
    results = runner.evaluate_baselines(merged, problem, build_data(first, problem))
    for label, (job, name) in RECIPES.items():
        target = out / Path(name).name
        print(f"{label}: adamerge {job} {name} -> {target}")
        recipe = load_recipe(resolve_recipe(name), [f"output_dir={target}", "overwrite=true"])
        results[label] = getattr(runner, job)(recipe).results
    table = results_table(results)
    accuracy_bars(results, out / "accuracy.png", title="digits zoo: accuracy per task")
    write_text(out / "summary.md", f"# Quickstart results\n\n{table}\n")
    print(f"\n{table}\n")
    print(f"Plots: {out / 'accuracy.png'} and {out / 'adamerging_layerwise' / 'coefficients.png'}")
    print(f"Each run's directory (recipe, coefficients, merged model, metrics) is under {out}/.")
    return results
