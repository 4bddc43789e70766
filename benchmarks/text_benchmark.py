"""The real-model benchmark: every method on the MiniLM text zoo, one table.

    python benchmarks/text_benchmark.py --data ../shared/data/text [--out runs/text-benchmark]

Builds (or reuses) the zoo of six all-MiniLM-L6-v2 experts fine-tuned on the tasks in
``--data`` (``benchmarks.zoos.text``), then runs each method's recipe from ``recipes/text/`` and
writes ``<out>/results.md`` and ``<out>/results.json``: per-task and average accuracy, wall
time, and the collapse diagnostics of every task (prediction histogram, entropy of the mean
prediction). Runs (and baselines) that already finished in ``<out>`` are reused, so an interrupted benchmark
resumes; ``--only LABEL`` (repeatable) picks methods, ``key=value`` overrides apply to every learned recipe.
Skips cleanly (exit 0) when the data directory is absent.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from common import normalised_accuracy, read_timing, run_recipe

from adamerge.app import runner
from adamerge.app.builders import build_data, build_merged, build_task_vectors
from adamerge.app.problems import build_problem
from adamerge.app.config import load_recipe, resolve_recipe
from adamerge.app.export import results_table
from adamerge.io.checkpoints import write_text
from adamerge.learning.evaluation import average_accuracy

# label -> (job, recipe, overrides, run folder); "{out}" is the benchmark's output folder.
STAGE1 = "{out}/expert_merging/coefficients.safetensors"
# the recommended recipe (progressive distillation from WUDI) started at TSV-M instead (as recipes/text/tsv.yaml)
START_TSV = ["task_vectors.start.method=tsv", "task_vectors.start.args.alpha=1.0"]
METHODS = {
    "weight averaging": ("merge", "text/average", [], "average"),
    "task arithmetic (0.3)": ("merge", "text/task_arithmetic", [], "task_arithmetic"),
    "TIES": ("merge", "text/ties", [], "ties"),
    "AdaMerging task-wise": ("fit", "text/adamerging_taskwise", [], "adamerging_taskwise"),
    "AdaMerging layer-wise": ("fit", "text/adamerging_layerwise", [], "adamerging_layerwise"),
    "AdaMerging++": ("fit", "text/adamerging_plusplus", [], "adamerging_plusplus"),
    "AdaRank (spectral, entropy)": ("fit", "text/adarank", [], "adarank"),
    "Expert Merging": ("fit", "text/expert_merging", [], "expert_merging"),
    "Expert Merging++ (stage 2 from stage 1)": (
        "fit", "text/expert_merging_pp", [f"coefficients.chunks.importance_from={STAGE1}", f"coefficients.init={STAGE1}"],
        "expert_merging_pp",
    ),
    "Expert Merging++ (stage 2 from 0.3)": (
        "fit", "text/expert_merging_pp", [f"coefficients.chunks.importance_from={STAGE1}", "coefficients.init=0.3"],
        "expert_merging_pp_from_init",
    ),
    "FW hard": ("fit", "text/fw_hard", [], "fw_hard"),
    "FW soft": ("fit", "text/fw_soft", [], "fw_soft"),
    "CMA-ES": ("fit", "text/cmaes", [], "cmaes"),
    "expert KL, log balance": ("fit", "text/expert_kl_guarded", ["task_balance=log"], "expert_kl_log_balance"),
    "TSV-M": ("merge", "text/tsv", [], "tsv"),
    "Iso-C": ("merge", "text/iso_c", [], "iso_c"),
    "Iso-CTS": ("merge", "text/iso_cts", [], "iso_cts"),
    "WUDI": ("merge", "text/wudi", [], "wudi"),
    "ProDistill": ("fit", "text/prodistill", [], "prodistill"),
    "expert KL, guarded (first recommended)": ("fit", "text/expert_kl_guarded", [], "expert_kl_guarded"),
    "recommended": ("fit", "text/recommended", [], "recommended_from_wudi"),
    "progressive from TSV-M": ("fit", "text/recommended", START_TSV, "recommended_from_tsv"),
    "progressive from task arithmetic (0.3)": (
        "fit", "text/recommended", ["task_vectors.start=null", "coefficients.init=0.3"], "recommended",
    ),
    "RegMean": ("merge", "text/regmean", [], "regmean"),
    "RegMean++": ("merge", "text/regmean_plusplus", [], "regmean_plusplus"),
    "Fisher merging": ("merge", "text/fisher", [], "fisher"),
    "sequential projection (OPCM)": ("merge", "text/sequential_projection", [], "sequential_projection"),
}


def run_method(label: str, out: Path, data: Path, zoo: Path, overrides: list[str]) -> dict:
    """Run one method (or reuse its finished run) and return its results with its wall time."""
    job, name, extra, folder = METHODS[label]
    target = out / folder
    if not (target / "eval.json").exists():
        settings = [f"problem.options.data_root={data}", f"problem.options.zoo_dir={zoo}", "trainer.progress_bar=false",
                    *(e.format(out=out) for e in extra), *(overrides if job == "fit" else [])]
        run_recipe(job, name, settings, target)
    timing = read_timing(target)
    return {"results": json.loads((target / "eval.json").read_text()), "seconds": timing.get("seconds"),
            "to_merge": timing.get("seconds_to_merge")}


def accuracy_table(results: dict[str, dict], seconds: dict, to_merge: dict) -> str:
    """Per-task accuracy, average, normalised accuracy and wall times (total; to the merged model)."""
    experts = results.get("experts", {})
    rows = results_table(results).splitlines()
    rows[0] += " normalised | wall time | to merged model |"
    rows[1] += "---|---|---|"
    for i, method in enumerate(results, start=2):
        norm = normalised_accuracy(results[method], experts)
        total, merged = seconds.get(method), to_merge.get(method)
        rows[i] += (f" {'' if norm is None else f'{100 * norm:.1f}'} | {'' if total is None else f'{total / 60:.1f} min'} |"
                    f" {'' if merged is None else f'{merged / 60:.1f} min'} |")
    return "\n".join(rows)


def baselines(data: Path, zoo: Path, out: Path) -> dict[str, dict]:
    """Each expert on its own task and the pretrained encoder with each head (kept in ``out``)."""
    saved = out / "baselines.json"
    if saved.exists():
        return json.loads(saved.read_text())
    recipe = load_recipe(
        resolve_recipe("text/task_arithmetic"), [f"problem.options.data_root={data}", f"problem.options.zoo_dir={zoo}"]
    )
    problem = build_problem(recipe.problem)
    merged = build_merged(recipe, problem, build_task_vectors(recipe, problem))
    results = runner.evaluate_baselines(merged, problem, build_data(recipe, problem))
    write_text(saved, json.dumps(results))
    return results


def diagnostics_table(all_results: dict[str, dict]) -> str:
    """Per task: prediction histogram and entropy of the mean prediction (÷ its maximum)."""
    lines = ["| method | task | histogram of predictions | H(mean prediction) / log C |", "|---|---|---|---|"]
    for method, per_task in all_results.items():
        for task, r in per_task.items():
            ratio = r["mean_prediction_entropy"] / r["max_entropy"] if r.get("max_entropy") else float("nan")
            lines.append(f"| {method} | {task} | {r.get('histogram', '')} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/text", help="folder of <task>/{train,test}.jsonl")
    parser.add_argument("--zoo", default=None, help="expert zoo folder (default: the adamerge cache)")
    parser.add_argument("--out", default="runs/text-benchmark")
    parser.add_argument("--only", action="append", default=None, metavar="LABEL",
                        help="a method label to run, repeatable (default: all)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the learned recipes")
    args = parser.parse_args(argv)
    unknown = [label for label in args.only or [] if label not in METHODS]
    if unknown:
        parser.error(f"unknown method label(s) {unknown}; choose from {list(METHODS)}")
    import datasets

    datasets.disable_progress_bars()  # one line per method, not one bar per tokenised split
    data = Path(args.data).expanduser().resolve()
    if not data.is_dir():
        print(f"no text data at {data}: nothing to benchmark")
        return 0
    from benchmarks.zoos.text import build_text_zoo, default_zoo_dir

    zoo = Path(args.zoo).expanduser() if args.zoo else default_zoo_dir()
    build_text_zoo(data, zoo)
    out = Path(args.out)
    results = baselines(data, zoo, out)
    seconds: dict[str, float | None] = {}
    to_merge: dict[str, float | None] = {}
    for label in args.only or METHODS:
        print(f"== {label}", flush=True)
        outcome = run_method(label, out, data, zoo, args.overrides)
        results[label], seconds[label], to_merge[label] = outcome["results"], outcome["seconds"], outcome["to_merge"]
        print(results_table({label: results[label]}), flush=True)
    table = accuracy_table(results, seconds, to_merge)
    report = (
        f"# Text benchmark\n\n`python benchmarks/text_benchmark.py {shlex.join(sys.argv[1:])}`\n\n"
        f"## Accuracy (%), normalised accuracy (÷ each task's expert) and wall time (2 CPU cores)\n\n{table}\n\n"
        f"## Collapse diagnostics\n\n{diagnostics_table(results)}\n"
    )
    write_text(out / "results.md", report)
    write_text(out / "results.json", json.dumps({"results": results, "seconds": seconds, "to_merge": to_merge}, indent=1))
    print(f"\n{table}\n\naverages: " + ", ".join(f"{k} {100 * average_accuracy(v):.1f}" for k, v in results.items()))
    print(f"report: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
