"""Lightning DDP on CPU (gloo, 2 processes) through the CLI: coefficients agree across ranks and
match a single-process run with the same global batch (each rank takes its slice of it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

TESTS = Path(__file__).resolve().parent


def fit(tmp_path: Path, name: str, *overrides: str) -> Path:
    """``python -m adamerge fit`` in a subprocess (DDP relaunches its command line); returns the record folder."""
    record = tmp_path / f"{name}-record"
    record.mkdir()
    recipe = {
        "name": name,
        "output_dir": str(tmp_path / name),
        "problem": {"kind": "ddp_problem:build"},
        "coefficients": {"granularity": "layer", "init": 0.3},
        "objectives": [{"name": "ddp_problem:RecordedEntropy", "args": {"record_dir": str(record)}}],
        "optimizer": {"name": "adam", "lr": 0.05},
        "trainer": {"max_steps": 6, "accelerator": "cpu", "progress_bar": False, "log_every_n_steps": 1},
        "evaluation": {"enabled": False},
        "export": {"plot": False, "mergekit": False, "merged_model": False},
    }
    path = tmp_path / f"{name}.yaml"
    OmegaConf.save(OmegaConf.create(recipe), path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "adamerge", "fit", str(path), *overrides],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / name / "coefficients.safetensors").exists()
    return record


def test_ddp_on_two_cpu_processes_matches_one_process_with_the_same_global_batch(tmp_path):
    single = fit(tmp_path, "single", "trainer.batch_size=8")
    ddp = fit(tmp_path, "ddp", "trainer.batch_size=4", "trainer.devices=2", "trainer.strategy=ddp")
    assert sorted(p.name for p in ddp.iterdir()) == ["rank0.pt", "rank1.pt"]
    rank0, rank1 = torch.load(ddp / "rank0.pt"), torch.load(ddp / "rank1.pt")
    reference = torch.load(single / "rank0.pt")
    assert not torch.allclose(reference, torch.full_like(reference, 0.3))  # it trained
    torch.testing.assert_close(rank0, rank1, rtol=0, atol=1e-6)
    torch.testing.assert_close(rank0, reference, rtol=0, atol=1e-6)
