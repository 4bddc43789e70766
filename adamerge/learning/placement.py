"""Where a job's tensor work runs, resolved once from the recipe's ``trainer`` section.

Every job — the Lightning learner, progressive and streamed distillation, FW-Merging, data-free
merges, evaluation — asks :func:`resolve_placement` and works on ``placement.device``; the CPU
is one device of the same code path. ``accelerator: auto`` takes a GPU when torch sees one;
``gpu`` on a machine without one is refused in one line before any model loads. On GPUs that
have TF32, float32 matmuls use it (``trainer.tf32: false`` keeps full float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
import torch

GPU_NAMES = ("gpu", "cuda")


class NoAcceleratorError(ValueError):
    """The recipe names an accelerator this machine does not have (a recipe error: status 2)."""


@dataclass(frozen=True)
class Placement:
    """This process's device for the work done outside Lightning (which takes
    ``trainer.accelerator`` and ``devices`` itself)."""

    device: torch.device

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def resolve_placement(trainer: Any) -> Placement:
    """The placement a ``trainer`` section (a config node or anything with its fields) asks for."""
    asked = str(trainer.accelerator).lower()
    has_gpu = torch.cuda.is_available()
    if asked in GPU_NAMES and not has_gpu:
        raise NoAcceleratorError(
            f"trainer.accelerator is {trainer.accelerator!r} but torch sees no GPU on this machine "
            f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'not built in'}); use accelerator: auto or cpu"
        )
    if asked not in ("auto", "cpu", *GPU_NAMES):
        raise NoAcceleratorError(f"trainer.accelerator is {trainer.accelerator!r}; use auto, cpu or gpu")
    gpu = asked in GPU_NAMES or (asked == "auto" and has_gpu)
    if gpu:
        devices = trainer.devices
        first = devices[0] if isinstance(devices, (list, tuple)) and devices else 0
        device = torch.device("cuda", int(first))
        torch.backends.cuda.matmul.allow_tf32 = bool(getattr(trainer, "tf32", True))
        torch.backends.cudnn.allow_tf32 = bool(getattr(trainer, "tf32", True))
    else:
        device = torch.device("cpu")
    return Placement(device)
