"""The LLM benchmark: merging methods on the SmolLM2-135M-Instruct zoo, one table.

    python benchmarks/lm_benchmark.py --data ../shared/data/text [--out runs/lm-benchmark] [--rows 200]

Builds (or reuses) the zoo of SmolLM2 experts (``benchmarks.zoos.lm``: one fully fine-tuned expert
per task, answering an instruction with a label word), runs each method's recipe from
``recipes/lm/`` through adamerge's own runner (``adamerge merge`` / ``adamerge fit``), and scores
the merged model its run directory exports (``merged/``) on the first ``--rows`` held-out rows
of every task: label-word accuracy (the label word with the highest likelihood given the
prompt), the average, the normalised accuracy (÷ each task's expert, averaged) and the
perplexity of the gold answers (label word + end of turn). The base model and each expert on
its own task are the baselines (read from the zoo's own measurements when ``--rows`` equals the
rows the zoo scored). Writes ``<out>/results.md`` and ``<out>/results.json``; finished runs and
scores in ``<out>`` are reused, so an interrupted benchmark resumes. ``--only LABEL``
(repeatable) picks methods; ``key=value`` overrides apply to every learned recipe. Skips
cleanly (exit 0) when the data directory is absent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from adamerge.io.checkpoints import write_text  # noqa: E402
from common import normalised_accuracy, read_timing, run_recipe  # noqa: E402

# label -> (job, recipe, overrides, run folder)
METHODS = {
    "task arithmetic (0.3)": ("merge", "lm/task_arithmetic", [], "task_arithmetic"),
    "TIES": ("merge", "lm/ties", [], "ties"),
    "TSV-M": ("merge", "lm/tsv", [], "tsv"),
    "Iso-C": ("merge", "lm/iso_c", [], "iso_c"),
    "Iso-CTS": ("merge", "lm/iso_cts", [], "iso_cts"),
    "WUDI": ("merge", "lm/wudi", [], "wudi"),
    "expert KL, layer-wise": ("fit", "lm/expert_kl", [], "expert_kl"),
    "streamed progressive": ("fit", "lm/streamed", [], "streamed"),
    "progressive, element-wise": ("fit", "lm/progressive", [], "progressive"),
    "expert KL on TSV-M components": ("fit", "lm/tsv_expert_kl", [], "tsv_expert_kl"),
    "expert KL from WUDI": ("fit", "lm/wudi_expert_kl", [], "wudi_expert_kl"),
    "streamed progressive from WUDI": ("fit", "lm/streamed_wudi", [], "streamed_wudi"),
    "streamed expert KL from WUDI": ("fit", "lm/streamed_expert_kl", [], "streamed_expert_kl"),
    "RegMean": ("merge", "lm/regmean", [], "regmean"),
    "RegMean++": ("merge", "lm/regmean_plusplus", [], "regmean_plusplus"),
}
BASE = "pretrained (SmolLM2-135M-Instruct)"
EXPERTS = "experts (each on its own task)"


def _is_finished_run(folder: Path) -> bool:
    merged = folder / "merged"
    return (folder / "recipe.yaml").is_file() and (merged / "config.json").is_file()


def score_folder(model_dir: Path, zoo, tasks: list[str], rows: int, batch_size: int) -> dict[str, dict]:
    import torch

    from benchmarks.zoos.lm_scoring import load_lm, score_model

    model, tokenizer = load_lm(model_dir)
    with torch.no_grad():
        return score_model(model, tokenizer, zoo.data, tasks, rows, batch_size)


def cached_scores(label: str, out: Path, tasks: list[str], rows: int) -> tuple[dict, float | None] | None:
    """A method's scores from an earlier benchmark run in ``out`` (same tasks and rows), if any."""
    try:
        saved = json.loads((out / METHODS[label][3] / "lm_scores.json").read_text())
    except (OSError, ValueError):
        return None
    if saved.get("rows") != rows or saved.get("tasks") != tasks:
        return None
    return saved["results"], read_timing(out / METHODS[label][3]).get("seconds")


def run_method(label: str, out: Path, zoo, tasks: list[str], rows: int, batch_size: int,
               overrides: list[str]) -> dict:
    """Run one method (or reuse its finished run), score its ``merged/`` folder, return both."""
    job, name, extra, folder = METHODS[label]
    target = out / folder
    scores_file = target / "lm_scores.json"
    if scores_file.exists():
        saved = json.loads(scores_file.read_text())
        if saved.get("rows") == rows and saved.get("tasks") == tasks:
            return {"results": saved["results"], "seconds": read_timing(target).get("seconds"),
                    "score_seconds": saved.get("seconds")}
    if not _is_finished_run(target):
        settings = [f"problem.cache_dir={zoo.zoo_dir}", "trainer.progress_bar=false", *extra,
                    *(overrides if job == "fit" else [])]
        run_recipe(job, name, settings, target)
    started = time.perf_counter()
    results = score_folder(target / "merged", zoo, tasks, rows, batch_size)
    score_seconds = time.perf_counter() - started
    write_text(scores_file, json.dumps({"rows": rows, "tasks": tasks, "results": results, "seconds": score_seconds},
                                       indent=1))
    return {"results": results, "seconds": read_timing(target).get("seconds"), "score_seconds": score_seconds}


def baselines(zoo, tasks: list[str], rows: int, out: Path, batch_size: int) -> dict[str, dict]:
    """The base model on every task and each expert on its own task (kept in ``out``)."""
    from benchmarks.zoos.cache import read_expert_meta

    saved = out / "baselines.json"
    if saved.exists():
        cached = json.loads(saved.read_text())
        if cached.get("rows") == rows and cached.get("tasks") == tasks:
            return cached["results"]
    metas = {t: read_expert_meta(zoo[t]) for t in tasks}
    if all(m.get("n_test") == rows and m.get("base_test_accuracy") is not None for m in metas.values()):
        # the zoo scored the same first `rows` held-out rows with the same helper while building
        base = {t: {"accuracy": m["base_test_accuracy"], "perplexity": m["base_test_perplexity"], "n": rows,
                    "source": "zoo build"} for t, m in metas.items()}
        experts = {t: {"accuracy": m["test_accuracy"], "perplexity": m["test_perplexity"], "n": rows,
                       "source": "zoo build"} for t, m in metas.items()}
    else:
        base = score_folder(Path(zoo.pretrained), zoo, tasks, rows, batch_size)
        experts = {t: score_folder(zoo[t], zoo, [t], rows, batch_size)[t] for t in tasks}
    results = {BASE: base, EXPERTS: experts}
    write_text(saved, json.dumps({"rows": rows, "tasks": tasks, "results": results}, indent=1))
    return results


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def accuracy_table(results: dict[str, dict], tasks: list[str], seconds: dict) -> str:
    experts = results.get(EXPERTS, {})
    head = "| method | " + " | ".join(tasks) + " | average | normalised | answer perplexity (geo. mean) | wall time |"
    lines = [head, "|---" * (len(tasks) + 5) + "|"]
    for method, per_task in results.items():
        accs = [per_task[t]["accuracy"] for t in tasks if t in per_task]
        ppls = [per_task[t]["perplexity"] for t in tasks if t in per_task]
        norm = normalised_accuracy(per_task, experts)
        wall = seconds.get(method)
        cells = [f"{100 * per_task[t]['accuracy']:.1f}" if t in per_task else "" for t in tasks]
        lines.append(
            f"| {method} | " + " | ".join(cells) + f" | {100 * _mean(accs):.1f} | "
            f"{'' if norm is None else f'{100 * norm:.1f}'} | "
            f"{math.exp(_mean([math.log(p) for p in ppls])):.2f} | {'' if wall is None else f'{wall / 60:.1f} min'} |"
        )
    return "\n".join(lines)


def perplexity_table(results: dict[str, dict], tasks: list[str]) -> str:
    lines = ["| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for method, per_task in results.items():
        lines.append(f"| {method} | " + " | ".join(
            f"{per_task[t]['perplexity']:.2f}" if t in per_task else "" for t in tasks) + " |")
    return "\n".join(lines)


def write_report(out: Path, results: dict, tasks: list[str], seconds: dict, rows: int) -> str:
    """``results.md`` and ``results.json`` for what has been scored so far; returns the table."""
    table = accuracy_table(results, tasks, seconds)
    report = (
        f"# LLM benchmark (SmolLM2-135M-Instruct zoo)\n\n`python benchmarks/lm_benchmark.py {shlex.join(sys.argv[1:])}`\n\n"
        f"Label-word accuracy (%) on the first {rows} held-out rows of each task, average, normalised "
        f"accuracy (÷ each task's expert) and the perplexity of the gold answers; wall time of the run "
        f"(merge or fit, not the scoring) on 2 CPU cores.\n\n{table}\n\n"
        f"## Answer perplexity per task\n\n{perplexity_table(results, tasks)}\n"
    )
    write_text(out / "results.md", report)
    write_text(out / "results.json", json.dumps({"rows": rows, "tasks": tasks, "results": results,
                                                 "seconds": seconds}, indent=1))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/text", help="folder of <task>/{train,test}.jsonl")
    parser.add_argument("--zoo", default=None, help="SmolLM2 zoo folder (default: the adamerge cache)")
    parser.add_argument("--out", default="runs/lm-benchmark")
    parser.add_argument("--rows", type=int, default=200, help="held-out rows scored per task")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per scoring forward")
    parser.add_argument("--only", action="append", default=None, metavar="LABEL",
                        help="a method label to run, repeatable (default: all)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the learned recipes")
    args = parser.parse_args(argv)
    unknown = [label for label in args.only or [] if label not in METHODS]
    if unknown:
        parser.error(f"unknown method label(s) {unknown}; choose from {list(METHODS)}")
    data = Path(args.data).expanduser().resolve()
    if not data.is_dir():
        print(f"no text data at {data}: nothing to benchmark")
        return 0
    import datasets
    import torch

    from benchmarks.zoos.lm import ZOO_META, build_lm_zoo, default_zoo_dir, open_lm_zoo

    datasets.disable_progress_bars()
    torch.set_num_threads(2)
    zoo_dir = Path(args.zoo).expanduser() if args.zoo else default_zoo_dir()
    # a built zoo is used as it is (whatever its settings); a missing one is built (resumable)
    zoo = open_lm_zoo(zoo_dir) if (zoo_dir / ZOO_META).is_file() else build_lm_zoo(data, zoo_dir)
    tasks = list(zoo)
    out = Path(args.out)
    results = baselines(zoo, tasks, args.rows, out, args.batch_size)
    seconds: dict[str, float | None] = {}
    for label in METHODS:
        if args.only and label not in args.only:
            earlier = cached_scores(label, out, tasks, args.rows)  # reported, not rerun
            if earlier is not None:
                results[label], seconds[label] = earlier
            continue
        print(f"== {label}", flush=True)
        outcome = run_method(label, out, zoo, tasks, args.rows, args.batch_size, args.overrides)
        results[label], seconds[label] = outcome["results"], outcome["seconds"]
        print(accuracy_table({label: results[label], EXPERTS: results[EXPERTS]}, tasks, seconds), flush=True)
        write_report(out, results, tasks, seconds, args.rows)  # after every method: an interrupted run keeps its table
    table = write_report(out, results, tasks, seconds, args.rows)
    print(f"\n{table}\nreport: {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
