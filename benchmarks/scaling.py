"""Scaling with the number of experts K: step time and peak memory of layer-wise AdaMerging on
the MiniLM zoo for K = 2, 4, 8, 16 (the six experts repeated, one task per expert, 16 inputs per
task per step), task vectors stored in float32 or bfloat16, against the predicted

    peak ≈ base + K·|τ|·bytes + (plain step increase) + |θ|·4

where ``base`` is everything but the task vectors (libraries, the pretrained model, tokenised
data, heads: the RSS just before the steps less the measured task-vector growth), ``|τ|`` the
merged entries per expert, the plain step increase is what
one forward + backward of the unmerged model on the same batches adds (activations and weight
gradients, measured the same way) and ``|θ|·4`` the fp32 merged weights alive during a step.

Every configuration runs in a fresh subprocess; its peak RSS mark is reset just before the
steps, so "step +" is what the steps themselves added; "+τ meas." is the growth of anonymous
memory (``RssAnon``) when the task vectors and the merged model are built. Then fp32 vs bf16 accuracy after the
same number of steps of the built-in recipe (K = 6, through ``adamerge.app.runner.fit``).

    python benchmarks/scaling.py [--experts 2 4 8 16] [--steps 4] [--accuracy-steps 100]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile

import torch

from common import (
    AdamergeStep,
    PlainStep,
    adamerge_learner,
    add_common_arguments,
    load_average,
    median,
    minilm_available,
    minilm_problem,
    minilm_recipe,
    reset_peak_rss,
    rss_mb,
    step_batches,
    task_vectors,
    timed,
)

MB = 2**20
MODES = ("plain", "plain per-task", "adamerge", "adamerge per-task")


def worker(args) -> dict:
    """One configuration, in this (fresh) process."""
    torch.set_num_threads(args.threads)
    problem = minilm_problem(args.data, args.zoo, experts=args.worker_experts)
    batches = step_batches(problem, args.steps + 1, args.batch)
    mode, result = args.worker_mode, {}
    if mode.startswith("plain"):
        step = PlainStep(problem, per_task=mode.endswith("per-task"))
    else:
        gc.collect()
        base_anon = rss_mb("RssAnon")
        vectors = task_vectors(problem, args.worker_dtype)
        result["tau_mb"] = vectors.nbytes() / MB
        result["merged_fp32_mb"] = vectors.numel() * 4 / MB
        learner = adamerge_learner(problem, vectors, per_task_backward=mode.endswith("per-task"), copy_backbone=False)
        step = AdamergeStep(learner)
        gc.collect()
        result["tau_anon_mb"] = rss_mb("RssAnon") - base_anon
    step(batches[0])  # warm-up (allocator, lazy initialisation)
    if mode.startswith("plain"):  # its weight gradients belong to the step, as the merged model's do
        for parameter in step.encoder.parameters():
            parameter.grad = None
    gc.collect()
    result["before_steps_mb"] = rss_mb()
    reset_peak_rss()
    result["step_s"] = median([timed(step, batch) for batch in batches[1:]])
    result["step_increase_mb"] = rss_mb("VmHWM") - result["before_steps_mb"]
    result["peak_mb"] = rss_mb("VmHWM")
    return result


def run_worker(args, experts: int, mode: str, dtype: str) -> dict:
    command = [sys.executable, __file__, "--worker-experts", str(experts), "--worker-mode", mode,
               "--worker-dtype", dtype, "--steps", str(args.steps), "--threads", str(args.threads),
               "--batch", str(args.batch), "--data", str(args.data), "--zoo", str(args.zoo)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # big blocks go back to the system when freed
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"worker {experts} {mode} {dtype} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def accuracy(args, dtype: str, steps: int) -> float:
    """Mean test accuracy over the six tasks after ``steps`` steps of the built-in recipe."""
    from adamerge.app import runner

    with tempfile.TemporaryDirectory() as folder:
        recipe = minilm_recipe(
            args.data, args.zoo, f"task_vectors.dtype={dtype}", f"trainer.max_steps={steps}",
            "trainer.progress_bar=false", f"output_dir={folder}/run", "export.merged_model=false",
            "export.plot=false", "export.mergekit=false", f"trainer.batch_size={args.batch}",
        )
        results = runner.fit(recipe).results
    return 100 * sum(r["accuracy"] for r in results.values()) / len(results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--accuracy-steps", type=int, default=100, help="0 skips the fp32/bf16 accuracy runs")
    parser.add_argument("--worker-experts", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--worker-dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_mode:
        print(json.dumps(worker(args)))
        return 0
    if not minilm_available(args.data, args.zoo):
        print(f"MiniLM zoo or data not found ({args.zoo}, {args.data}): nothing to measure")
        return 0
    print(f"{args.threads} threads, {args.batch} inputs per task per step, load average {load_average():.2f} at start")
    print(f"\n{'K':>3} {'storage':<9}{'backward':<10}{'step s':>8}{'base':>8}{'+τ meas.':>10}{'K|τ|b':>8}"
          f"{'step +':>8}{'plain +':>9}{'peak':>8}{'predicted':>11}   (MiB)")
    for experts in args.experts:
        plain = {mode: run_worker(args, experts, f"plain{mode}", "float32") for mode in ("", " per-task")}
        for dtype in ("float32", "bfloat16"):
            for backward in ("joint", "per-task"):
                mode = "adamerge" + (" per-task" if backward == "per-task" else "")
                r = run_worker(args, experts, mode, dtype)
                plain_increase = plain["" if backward == "joint" else " per-task"]["step_increase_mb"]
                base = r["before_steps_mb"] - r["tau_anon_mb"]
                predicted = base + r["tau_mb"] + plain_increase + r["merged_fp32_mb"]
                print(f"{experts:>3} {dtype:<9}{backward:<10}{r['step_s']:>8.2f}{base:>8.0f}"
                      f"{r['tau_anon_mb']:>10.0f}{r['tau_mb']:>8.0f}{r['step_increase_mb']:>8.0f}"
                      f"{plain_increase:>9.0f}{r['peak_mb']:>8.0f}{predicted:>11.0f}", flush=True)
        print(f"{experts:>3} plain step: {plain['']['step_s']:.2f} s (per-task backward "
              f"{plain[' per-task']['step_s']:.2f} s)", flush=True)
    if args.accuracy_steps:
        torch.set_num_threads(args.threads)
        fp32, bf16 = (accuracy(args, dtype, args.accuracy_steps) for dtype in ("float32", "bfloat16"))
        print(f"\nmean test accuracy after {args.accuracy_steps} steps (K = 6): float32 {fp32:.2f}, "
              f"bfloat16 {bf16:.2f} (difference {bf16 - fp32:+.2f} points)")
    print(f"\nload average {load_average():.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
