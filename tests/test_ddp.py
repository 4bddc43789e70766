"""A cross-cutting end-to-end suite: Lightning DDP on CPU (gloo, 2 processes) through the CLI:
coefficients agree across ranks and match a single-process run with the same global batch (each
rank takes its slice of it); the evaluation that follows runs on both processes, each on its
share of the rows, and writes what one process evaluating the same coefficients finds (and logs
it to the run's CSV log). Its subprocesses build their problem with ddp_problem.py, beside this file."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from adamerge.app.runner import evaluate_run

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
        "evaluation": {"batch_size": 4},
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


def assert_evaluated_as_one_process(run: Path) -> None:
    """eval.json holds every evaluation row once and equals one process's evaluation of the run's
    coefficients; the run's CSV log holds the same numbers."""
    written = json.loads((run / "eval.json").read_text())
    assert {name: r["samples"] for name, r in written.items()} == {"t0": 21, "t1": 1}  # no row twice, none left out
    again = evaluate_run(run)
    assert written.keys() == again.keys()
    for name, result in again.items():
        assert written[name].keys() == result.keys()
        for key, value in result.items():
            assert written[name][key] == (value if isinstance(value, (int, list)) else pytest.approx(value, rel=1e-6)), (name, key)
    logged = [row for row in csv.DictReader(open(run / "metrics.csv")) if row.get("eval/t0/accuracy")]
    assert len(logged) == 1
    assert float(logged[0]["eval/t0/accuracy"]) == pytest.approx(written["t0"]["accuracy"], rel=1e-6)
    assert float(logged[0]["eval/t1/loss"]) == pytest.approx(written["t1"]["loss"], rel=1e-6)


def test_ddp_on_two_cpu_processes_matches_one_process_with_the_same_global_batch(tmp_path):
    single = fit(tmp_path, "single", "trainer.batch_size=8")
    ddp = fit(tmp_path, "ddp", "trainer.batch_size=4", "trainer.devices=2", "trainer.strategy=ddp")
    assert sorted(p.name for p in ddp.iterdir()) == ["rank0.pt", "rank1.pt"]
    rank0, rank1 = torch.load(ddp / "rank0.pt"), torch.load(ddp / "rank1.pt")
    reference = torch.load(single / "rank0.pt")
    assert not torch.allclose(reference, torch.full_like(reference, 0.3))  # it trained
    torch.testing.assert_close(rank0, rank1, rtol=0, atol=1e-6)
    torch.testing.assert_close(rank0, reference, rtol=0, atol=1e-6)
    assert_evaluated_as_one_process(tmp_path / "ddp")


def test_evaluation_on_two_spawned_processes_equals_one_process(tiny_merge, assert_same_results):
    """One row per task shared out over two processes: the second has none at all, yet joins in the
    sums (the DDP run above covers a process with some tasks' rows only); the results come back
    from the workers."""
    import lightning as L

    from adamerge.learning.evaluation import evaluate

    sizes = (1, 1)
    merged, tasks, data = tiny_merge(sizes)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    spawned = evaluate(merged, tasks, data, trainer=trainer)
    assert {name: r["samples"] for name, r in spawned.items()} == dict(zip("ab", sizes))
    assert_same_results(spawned, evaluate(merged, tasks, data))


@pytest.mark.slow
def test_ddp_spawn_evaluates_in_its_workers_and_brings_the_results_back(tmp_path):
    fit(tmp_path, "spawn", "trainer.batch_size=4", "trainer.devices=2", "trainer.strategy=ddp_spawn")
    assert_evaluated_as_one_process(tmp_path / "spawn")
