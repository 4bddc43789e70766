"""The digits zoo's domains and splits (adamerge.zoo.digit_domains): each transform does what its
name says, the splits are disjoint and stratified, and a task's data does not depend on the others."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from adamerge.zoo.digit_domains import SPLITS, TASK_SPECS, make_data, split_indices

SETTINGS = SimpleNamespace(seed=0, test_fraction=0.3, calibration_fraction=0.1)


def test_splits_are_disjoint_cover_every_image_and_hold_each_digit_in_proportion():
    digits = np.repeat(np.arange(10), 20)
    parts = split_indices(digits, SETTINGS)
    together = np.concatenate([parts[s] for s in SPLITS])
    assert sorted(together.tolist()) == list(range(len(digits)))
    for split, share in (("test", 0.3), ("calibration", 0.1)):
        counts = np.bincount(digits[parts[split]], minlength=10)
        assert (counts == round(share * 20)).all()


def test_each_domain_is_its_transform_of_the_upright_images():
    data = make_data(SETTINGS, ["upright", "rotated", "inverted", "mirrored", "upside_down"])
    upright = data["upright"]["test"][0].reshape(-1, 8, 8)
    assert torch.equal(data["rotated"]["test"][0].reshape(-1, 8, 8), torch.rot90(upright, 1, (1, 2)))
    assert torch.allclose(data["inverted"]["test"][0].reshape(-1, 8, 8), 1 - upright)
    assert torch.equal(data["mirrored"]["test"][0].reshape(-1, 8, 8), upright.flip(2))
    assert torch.equal(data["upside_down"]["test"][0].reshape(-1, 8, 8), upright.flip(1, 2))
    assert all(torch.equal(data[t]["test"][1], data["upright"]["test"][1]) for t in data)  # same digits


def test_noise_is_reproducible_and_independent_of_the_other_tasks():
    alone = make_data(SETTINGS, ["noisy"])["noisy"]["calibration"][0]
    with_others = make_data(SETTINGS, ["upright", "noisy"])["noisy"]["calibration"][0]
    assert torch.equal(alone, with_others) and 0.0 <= alone.min() and alone.max() <= 1.0
    assert set(TASK_SPECS) >= {"upright", "rotated", "inverted", "mirrored", "noisy"}
