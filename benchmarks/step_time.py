"""Floor ratio: how much more one layer-wise AdaMerging step costs than one forward + backward
of the model itself, and where the time goes.

For each zoo (MiniLM, K = 6 tasks, real text from the shared test sets; and a tiny BERT zoo),
on identical ``{task: 16 inputs}`` batches, interleaved step by step in one process:

- ``plain``: the unmerged backbone (weights requiring grad) with each task's own head, as
  ordinary modules: forward every task, one backward (the floor);
- ``adamerge``: the learner's step (one merge, every task's forward, one backward, Adam);
- ``adamerge per-task``: the same with ``per_task_backward=True`` (one task's activations alive
  at a time).

Ratios are medians of ``--steps`` steps after ``--warmup``. Then a phase breakdown (merge
forward, task forwards, backward through the model, backward through the merge, optimiser)
and, with ``torch.profiler``, the share of each step spent outside aten kernels (Python,
autograd, dispatch; inflated a little by the profiler itself).

    python benchmarks/step_time.py [--steps 12] [--warmup 2] [--threads 2] [--tiny-steps 60]
"""

from __future__ import annotations

import argparse
import sys
import time

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
    step_batches,
    task_vectors,
    timed,
    tiny_problem,
)


def interleaved(variants: dict, batches: list, warmup: int) -> dict[str, list[float]]:
    """Step times of every variant, round by round on the same batch (order rotated each round)."""
    times = {name: [] for name in variants}
    names = list(variants)
    for index, batch in enumerate(batches):
        for name in names[index % len(names):] + names[: index % len(names)]:
            seconds = timed(variants[name], batch)
            if index >= warmup:
                times[name].append(seconds)
    return times


def adamerge_phases(step: AdamergeStep, batch) -> dict[str, float]:
    """The joint step, phase by phase: the backward is split at the merged weights."""
    learner, clock = step.learner, time.perf_counter
    merged = learner.merged
    step.optimizer.zero_grad()
    t0 = clock()
    params = merged.merged_parameters()
    t1 = clock()
    loss = sum(learner.objective(learner.tasks[n](merged, params, b), b, n) for n, b in batch.items())
    t2 = clock()
    keys = list(params)
    grads = torch.autograd.grad(loss, [params[k] for k in keys], allow_unused=True)
    t3 = clock()
    used = [(params[k], g) for k, g in zip(keys, grads) if g is not None]
    torch.autograd.backward([p for p, _ in used], [g for _, g in used])
    t4 = clock()
    step.optimizer.step()
    merged.coefficients.project_()
    t5 = clock()
    return {"merge forward": t1 - t0, "task forwards": t2 - t1, "backward (model)": t3 - t2,
            "backward (merge)": t4 - t3, "optimizer": t5 - t4}


def plain_phases(step: PlainStep, batch) -> dict[str, float]:
    clock = time.perf_counter
    for parameter in step.encoder.parameters():
        parameter.grad = None
    t0 = clock()
    loss = step.loss(batch)
    t1 = clock()
    loss.backward()
    t2 = clock()
    return {"task forwards": t1 - t0, "backward (model)": t2 - t1}


def outside_kernels(fn, batch) -> tuple[float, float]:
    """(wall seconds, seconds outside aten ops) of one profiled call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = timed(fn, batch)
    inside = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith("aten::")) / 1e6
    return wall, max(wall - inside, 0.0)


def report(title: str, problem, batch_size: int, steps: int, warmup: int) -> None:
    batches = step_batches(problem, warmup + steps, batch_size)
    vectors = task_vectors(problem)
    joint = AdamergeStep(adamerge_learner(problem, vectors))
    per_task = AdamergeStep(adamerge_learner(problem, vectors, per_task_backward=True))
    plain = PlainStep(problem)
    rows = sum(len(b["input_ids"]) for b in batches[0].values())
    print(f"\n## {title}: K = {len(problem.tasks)} tasks, {rows} inputs per step, "
          f"{vectors.numel() / 1e6:.1f} M merged entries per expert, {len(vectors)} tensors")
    times = interleaved({"plain": plain, "adamerge": joint, "adamerge per-task": per_task}, batches, warmup)
    floor = median(times["plain"])
    print(f"{'step':<20}{'median s':>10}{'ratio':>8}   ({steps} steps after {warmup} warm-up, interleaved)")
    for name, values in times.items():
        print(f"{name:<20}{median(values):>10.4f}{median(values) / floor:>8.3f}")

    phases = {"plain": [], "adamerge": []}
    for batch in batches[warmup:]:
        phases["plain"].append(plain_phases(plain, batch))
        phases["adamerge"].append(adamerge_phases(joint, batch))
    names = list(phases["adamerge"][0])
    print(f"\n{'phase (median s)':<20}{'plain':>10}{'adamerge':>10}")
    for phase in names:
        values = {v: median([p[phase] for p in phases[v]]) if phase in phases[v][0] else None for v in phases}
        cells = "".join(f"{'-' if x is None else f'{x:.4f}':>10}" for x in values.values())
        print(f"{phase:<20}{cells}")
    for name, fn in (("plain", plain), ("adamerge", joint)):
        wall, outside = outside_kernels(fn, batches[warmup])
        print(f"profiled {name}: {wall:.4f} s, {outside:.4f} s ({100 * outside / wall:.0f}%) outside aten kernels")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--steps", type=int, default=12, help="timed MiniLM steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tiny-steps", type=int, default=60, help="timed tiny-model steps per variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, load average {load_average():.2f} at start")
    report("tiny BERT (2 layers, hidden 64)", tiny_problem(), args.batch, args.tiny_steps, args.warmup)
    if minilm_available(args.data, args.zoo):
        report("MiniLM-L6 text zoo", minilm_problem(args.data, args.zoo), args.batch, args.steps, args.warmup)
    else:
        print(f"\nMiniLM zoo or data not found ({args.zoo}, {args.data}): MiniLM skipped")
    print(f"\nload average {load_average():.2f} at the end (timings are only meaningful on an idle machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
