"""A support module, not a test file: the training subprocesses of test_ddp.py load it by dotted
path (``problem.kind: ddp_problem:build``, with ``tests/`` on ``PYTHONPATH``), where no pytest
fixture reaches. A tiny merge problem, and an entropy objective that records each process's
final coefficients (only rank 0 writes a run directory). Task t0 has 21 labelled evaluation rows
(two processes share them 11 + 10), t1 has 1 (the second process has none of t1's rows and must
still join in the sums)."""

from __future__ import annotations

import atexit
from pathlib import Path

import torch
from torch import nn

from adamerge.objectives.entropy import Entropy
from adamerge.app.problems.problem import MergeProblem
from adamerge.tasks.base import HeadTask

TASKS, ROWS, EVALUATION_ROWS = ("t0", "t1"), 40, (21, 1)


def build(config) -> MergeProblem:
    """Backbone 6 -> 16 -> 8, two experts (seeded noise), a frozen 8 -> 4 head, 40 calibration rows
    per task and the labelled evaluation rows of EVALUATION_ROWS."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8)).eval()
    experts, tasks, data, evaluation = {}, {}, {}, {}
    for k, (name, size) in enumerate(zip(TASKS, EVALUATION_ROWS)):
        generator = torch.Generator().manual_seed(10 + k)
        experts[name] = {n: t + 0.5 * torch.randn(t.shape, generator=generator) for n, t in base.state_dict().items()}
        tasks[name] = HeadTask(name, nn.Linear(8, 4))
        data[name] = [{"inputs": torch.randn(6, generator=generator)} for _ in range(ROWS)]
        evaluation[name] = [{"inputs": torch.randn(6, generator=generator), "label": int(torch.randint(4, (), generator=generator))}
                            for _ in range(size)]
    return MergeProblem(pretrained=base, experts=experts, tasks=tasks, calibration=data, evaluation=evaluation)


class RecordedEntropy(Entropy):
    """Entropy that saves this process's coefficients to ``<record_dir>/rank<r>.pt`` when it exits."""

    def __init__(self, record_dir: str):
        super().__init__()
        self.record_dir = record_dir

    def setup(self, context) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        path = Path(self.record_dir) / f"rank{rank}.pt"
        coefficients = context.merged.coefficients
        atexit.register(lambda: torch.save(coefficients().detach().clone(), path))
