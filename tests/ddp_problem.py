"""A tiny merge problem that a training subprocess can build by dotted path
(``problem.kind: ddp_problem:build``, with ``tests/`` on ``PYTHONPATH``), and an entropy
objective that records each process's final coefficients (only rank 0 writes a run directory)."""

from __future__ import annotations

import atexit
from pathlib import Path

import torch
from torch import nn

from adamerge.objectives.entropy import Entropy
from adamerge.app.problems import MergeProblem
from adamerge.tasks.base import HeadTask

TASKS, ROWS = ("t0", "t1"), 40


def build(config) -> MergeProblem:
    """Backbone 6 -> 16 -> 8, two experts (seeded noise), a frozen 8 -> 4 head and 40 rows per task."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8)).eval()
    experts, tasks, data = {}, {}, {}
    for k, name in enumerate(TASKS):
        generator = torch.Generator().manual_seed(10 + k)
        experts[name] = {n: t + 0.5 * torch.randn(t.shape, generator=generator) for n, t in base.state_dict().items()}
        tasks[name] = HeadTask(name, nn.Linear(8, 4))
        data[name] = [{"inputs": torch.randn(6, generator=generator)} for _ in range(ROWS)]
    return MergeProblem(pretrained=base, experts=experts, tasks=tasks, calibration=data)


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
