"""Fixtures shared by more than one test file (a test file never imports another). Each module of
``tests/fixtures`` builds one kind of thing and is loaded here as a plugin, so its fixtures reach
every test; this file keeps only what every test runs under: a fixed torch seed."""

from __future__ import annotations

import pytest
import torch

pytest_plugins = [
    "fixtures.families",
    "fixtures.merges",
    "fixtures.resume",
    "fixtures.learners",
    "fixtures.text_zoo",
    "fixtures.hf_models",
    "fixtures.objectives",
]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
