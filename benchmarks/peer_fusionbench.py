"""Peer ratio: adamerge's layer-wise AdaMerging step against FusionBench's on the same MiniLM zoo,
the same batches, the same start (0.3), optimiser (Adam, lr 1e-3) and number of steps, in one
process, steps interleaved.

FusionBench runs as its ``LayerWiseAdaMergingAlgorithm.test_time_adaptation`` does: its
``LayerWiseMergedModel`` wrapper (defaults of its CLIP/GPT-2 configs: no clamping,
``tie_weights`` on, ``strict`` off) merges once per step, then every task runs a forward and
``backward(retain_graph=True)`` with FusionBench's ``entropy_loss``, then Adam. Both start from
the same pretrained encoder, experts and heads. After the run both merges are evaluated by the
same code on the full test sets.

FusionBench is not a dependency of adamerge; install it into its own environment (CPU torch
first, so pip never pulls a CUDA build) and run this script from there:

    python3 -m venv /work/venv-bench && . /work/venv-bench/bin/activate
    pip install torch==2.13.0 && pip install -e /work/main && pip install fusion-bench
    python benchmarks/peer_fusionbench.py [--steps 100] [--threads 2]

Without ``fusion_bench`` (or without the zoo and data) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from torch import nn

from common import (
    AdamergeStep,
    adamerge_learner,
    add_common_arguments,
    load_average,
    median,
    minilm_available,
    minilm_problem,
    minilm_recipe,
    step_batches,
    task_vectors,
    timed,
)

INIT, LR = 0.3, 1e-3


class FusionBenchStep:
    """One step of FusionBench's layer-wise AdaMerging loop over the MiniLM encoder."""

    def __init__(self, problem):
        from fusion_bench.method.adamerging.entropy_loss import entropy_loss
        from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel, get_layer_wise_weights

        from adamerge.io.checkpoints import open_weights

        self.entropy_loss = entropy_loss
        self.prefix = problem.pretrained.base_model_prefix + "."
        encoder = copy.deepcopy(problem.pretrained.base_model)
        finetuned = []
        for source in problem.experts.values():
            weights = open_weights(source)
            expert = copy.deepcopy(encoder)
            expert.load_state_dict({k[len(self.prefix):]: weights[k] for k in weights if k.startswith(self.prefix)})
            finetuned.append(expert)
        layers = len([p for p in encoder.parameters() if p.requires_grad])
        self.module = LayerWiseMergedModel(
            get_layer_wise_weights(len(finetuned), layers, INIT), encoder, finetuned,
            clamp_weights=False, tie_weights=True, strict=False,
        )
        self.heads = {}
        for name, task in problem.tasks.items():
            weights = {k.split(".", 1)[1]: v for k, v in task.head.as_dict().items()}
            head = nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
            head.load_state_dict(weights)
            self.heads[name] = head.requires_grad_(False)
        self.optimizer = torch.optim.Adam([self.module.merge_weight], lr=LR)
        self.module.merge_weights()

    def __call__(self, batch) -> None:
        for name, task_batch in batch.items():
            inputs = {k: task_batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in task_batch}
            logits = self.heads[name](self.module(**inputs).pooler_output)
            self.entropy_loss(logits).backward(retain_graph=True)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.module.merge_weights()

    @torch.no_grad()
    def merged_parameters(self) -> dict[str, torch.Tensor]:
        """The current merge, named as in the full sequence classifier."""
        return {self.prefix + k: v.detach() for k, v in self.module.merge_weights().items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--steps", type=int, default=100, help="steps each (all count for accuracy)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing medians")
    args = parser.parse_args()
    try:
        import fusion_bench  # noqa: F401
    except ImportError:
        print("fusion_bench is not importable here: install it as this script's docstring says; skipped")
        return 0
    if not minilm_available(args.data, args.zoo):
        print(f"MiniLM zoo or data not found ({args.zoo}, {args.data}): skipped")
        return 0
    from importlib.metadata import version

    from adamerge.app import runner
    from adamerge.app.builders import build_data

    torch.set_num_threads(args.threads)
    print(f"fusion-bench {version('fusion-bench')}, torch {torch.__version__}, {args.threads} threads, "
          f"load average {load_average():.2f} at start")
    problem = minilm_problem(args.data, args.zoo)
    batches = step_batches(problem, args.steps, args.batch)
    ours = AdamergeStep(adamerge_learner(problem, task_vectors(problem), lr=LR))
    theirs = FusionBenchStep(problem)
    times = {"adamerge": [], "fusion_bench": []}
    for index, batch in enumerate(batches):
        order = [("adamerge", ours), ("fusion_bench", theirs)]
        for name, step in order if index % 2 == 0 else order[::-1]:
            seconds = timed(step, batch)
            if index >= args.warmup:
                times[name].append(seconds)
    a, f = median(times["adamerge"]), median(times["fusion_bench"])
    print(f"\nK = {len(problem.tasks)} tasks, {args.batch} inputs per task per step, {args.steps} steps each "
          f"(medians over the last {args.steps - args.warmup}, interleaved)")
    print(f"{'':<14}{'median s/step':>14}{'steps/s':>9}")
    for name, value in (("adamerge", a), ("fusion_bench", f)):
        print(f"{name:<14}{value:>14.3f}{1 / value:>9.3f}")
    print(f"peer ratio (adamerge steps/s ÷ FusionBench steps/s): {f / a:.2f}")

    ours_values = ours.learner.merged.coefficients().detach()
    theirs_values = theirs.module.merge_weight.detach()
    print(f"largest coefficient difference after {args.steps} steps: {(ours_values - theirs_values).abs().max():.2e}")
    data = build_data(minilm_recipe(args.data, args.zoo), problem)
    merged = ours.learner.merged
    results = {
        "adamerge": runner.evaluate_problem(merged, problem, data),
        "fusion_bench": runner.evaluate_problem(merged, problem, data, params=theirs.merged_parameters()),
    }
    tasks = list(results["adamerge"])
    print(f"\ntest accuracy (%) after {args.steps} steps")
    print(f"{'':<14}" + "".join(f"{t:>10}" for t in tasks) + f"{'mean':>10}")
    for name, result in results.items():
        accuracies = [100 * result[t]["accuracy"] for t in tasks]
        print(f"{name:<14}" + "".join(f"{x:>10.2f}" for x in accuracies) + f"{sum(accuracies) / len(tasks):>10.2f}")
    print(f"\nload average {load_average():.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
