"""The digits zoo's tasks: input domains of scikit-learn's digits, and their disjoint splits.

Each task shows the digits in its own, visibly different *input domain* (the transform below)
applied to every split:

================  =========================================
task              inputs
================  =========================================
``upright``       the original images
``rotated``       rotated 90 degrees counter-clockwise
``inverted``      intensity inverted (``1 - x``: white background)
``mirrored``      mirrored left-right
``noisy``         shifted one pixel down-right, plus Gaussian noise (sigma 0.2)
``upside_down``   rotated 180 degrees (not in the default five)
================  =========================================
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

SPLITS = ("train", "calibration", "test")


# ---------------------------------------------------------------------- domains


def _identity(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return images


def _rotate(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.rot90(images, k=1, axes=(1, 2))


def _invert(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 1.0 - images


def _mirror(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return images[:, :, ::-1]


def _shift_noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    shifted = np.roll(images, shift=(1, 1), axis=(1, 2))
    return np.clip(shifted + rng.normal(0.0, 0.2, size=images.shape), 0.0, 1.0)


def _upside_down(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return images[:, ::-1, ::-1]


@dataclass(frozen=True)
class DigitTask:
    """One task of the zoo: its input domain (a transform of the 8x8 images) and its classes."""

    name: str
    domain: str
    transform: Callable[[np.ndarray, np.random.Generator], np.ndarray] = field(repr=False, compare=False)
    num_classes: int = 10


TASK_SPECS: dict[str, DigitTask] = {
    "upright": DigitTask("upright", "original images", _identity),
    "rotated": DigitTask("rotated", "rotated 90 degrees counter-clockwise", _rotate),
    "inverted": DigitTask("inverted", "inverted intensity (white background)", _invert),
    "mirrored": DigitTask("mirrored", "mirrored left-right", _mirror),
    "noisy": DigitTask("noisy", "shifted one pixel + Gaussian noise", _shift_noise),
    "upside_down": DigitTask("upside_down", "rotated 180 degrees", _upside_down),
}


# ---------------------------------------------------------------------- data


def split_indices(digits: np.ndarray, settings) -> dict[str, np.ndarray]:
    """Stratified by digit, so every split holds each digit in proportion."""
    rng = np.random.default_rng(settings.seed)
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(digits == digit))
        n_test = int(round(settings.test_fraction * len(members)))
        n_cal = int(round(settings.calibration_fraction * len(members)))
        parts["test"].append(members[:n_test])
        parts["calibration"].append(members[n_test : n_test + n_cal])
        parts["train"].append(members[n_test + n_cal :])
    return {split: np.sort(np.concatenate(chunks)) for split, chunks in parts.items()}


def make_data(settings, names: Sequence[str]) -> dict[str, dict[str, tuple[Tensor, Tensor]]]:
    """``task -> split -> (inputs [N, 64] float32, digit labels [N] int64)``."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = raw.images.astype(np.float64) / 16.0
    digits = raw.target.astype(np.int64)
    indices = split_indices(digits, settings)
    data: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}
    for name in names:
        task = TASK_SPECS[name]
        data[name] = {}
        for split_index, split in enumerate(SPLITS):
            # one generator per (seed, task, split): noise is reproducible and independent of task order
            rng = np.random.default_rng([settings.seed, zlib.crc32(name.encode()), split_index])
            transformed = np.ascontiguousarray(task.transform(images[indices[split]], rng))
            inputs = torch.from_numpy(transformed.reshape(len(transformed), 64).astype(np.float32))
            data[name][split] = (inputs, torch.from_numpy(digits[indices[split]]))
    return data
