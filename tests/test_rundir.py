"""The run directory on its own: the lock (held while a run works, refused to a second live run,
taken over when stale), paths kept inside the run, where an interrupted run resumes (a different
recipe refused naming its keys, a partial run without a checkpoint cleared), the inputs' record
and the training log joined across resumes. Runs through the runner are in test_reliability.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from adamerge.app import rundir
from adamerge.app.config import load_recipe, save_recipe


def test_the_lock_is_held_while_the_body_runs_and_refused_to_a_live_holder(tmp_path):
    work_dir = tmp_path / "run.partial"
    with rundir.run_lock(work_dir):
        held = json.loads((work_dir / "lock").read_text())
        assert held == {"pid": os.getpid(), "host": socket.gethostname()}
        with pytest.raises(FileExistsError, match=rf"in use by a live run \(PID {os.getpid()} on"), rundir.run_lock(work_dir):
            pass
    assert not (work_dir / "lock").exists()


@pytest.mark.parametrize("stale", ["dead pid", "cut short"])
def test_a_stale_lock_is_taken_over(tmp_path, stale):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    work_dir = tmp_path / "run.partial"
    work_dir.mkdir()
    text = json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}) if stale == "dead pid" else '{"pid": 1'
    (work_dir / "lock").write_text(text)
    with rundir.run_lock(work_dir):
        assert json.loads((work_dir / "lock").read_text())["pid"] == os.getpid()


def test_paths_outside_the_run_directory_are_refused(tmp_path):
    assert rundir.inside(tmp_path, tmp_path / "heads" / "a.safetensors") == tmp_path / "heads" / "a.safetensors"
    for escaping in (tmp_path / ".." / "x", Path("/any/dir/x"), tmp_path / "heads" / "../../x"):
        with pytest.raises(ValueError, match="lies outside"):
            rundir.inside(tmp_path, escaping)
    (tmp_path / "link").symlink_to(tmp_path.parent)
    with pytest.raises(ValueError, match="lies outside"):
        rundir.inside(tmp_path, tmp_path / "link" / "x")


def test_differing_keys_are_dotted():
    before = {"optimizer": {"lr": 1, "name": "adam"}, "objectives": [{"name": "entropy"}], "seed": 0}
    now = {"optimizer": {"lr": 2, "name": "adam"}, "objectives": [{"name": "infomax"}], "seed": 0, "new": 1}
    assert rundir.differing_keys(before, now) == ["optimizer.lr", "objectives.0.name", "new"]
    assert rundir.differing_keys({"a": [1]}, {"a": [1, 2]}) == ["a"]


def test_where_an_interrupted_run_resumes(tmp_path):
    recipe = load_recipe({"problem": {"kind": "digits"}, "optimizer": {"lr": 0.1}})
    work_dir = tmp_path / "run.partial"
    save_recipe(load_recipe({"problem": {"kind": "digits"}, "optimizer": {"lr": 0.5}}), work_dir / "recipe.yaml")
    (work_dir / "metrics.csv").write_text("stale\n")
    (work_dir / "lock").write_text("mine")
    assert rundir.resume_point(recipe, work_dir) is None  # no checkpoint: started afresh, whatever it held
    assert sorted(p.name for p in work_dir.iterdir()) == ["lock", "recipe.yaml"]
    assert load_recipe(work_dir / "recipe.yaml") == recipe
    (work_dir / "checkpoints").mkdir()
    (work_dir / "checkpoints" / "last.ckpt").write_bytes(b"a checkpoint of that recipe")
    other = load_recipe({"problem": {"kind": "digits"}, "optimizer": {"lr": 0.2}, "seed": 3})
    with pytest.raises(ValueError, match=r"different recipe \(differing: seed, optimizer\.lr\)"):  # in the recipe's order
        rundir.resume_point(other, work_dir)


def test_the_inputs_record_names_what_changed(tmp_path):
    data, base = tmp_path / "data.jsonl", tmp_path / "base"
    data.write_text("{}\n")
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"weights")
    run = tmp_path / "run"
    run.mkdir()
    rundir.write_inputs(run, {str(data): "task 'a' data"}, {"base": str(base)})
    inputs = json.loads((run / "inputs.json").read_text())
    assert {Path(f).name: e["role"] for f, e in inputs.items()} == {"data.jsonl": "task 'a' data", "model.safetensors": "pretrained"}
    assert rundir.changed_inputs(run) == []
    data.write_text("{}\n{}\n")
    (base / "model.safetensors").unlink()
    assert sorted(rundir.changed_inputs(run)) == [f"pretrained {base / 'model.safetensors'} is gone",
                                                  f"task 'a' data {data} changed since the run"]


def test_the_training_log_is_joined_across_a_resume(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,train/loss\n0,1.0\n1,0.9\n2,0.8\n")
    rundir._set_log_aside(tmp_path)  # resuming from step 2: the rows so far wait aside
    assert not (tmp_path / "metrics.csv").exists()
    (tmp_path / "metrics.csv").write_text("step,train/loss,eval/a/accuracy\n2,0.7,\n3,0.6,0.5\n")
    rundir.restore_log(tmp_path)
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [
        "step,train/loss,eval/a/accuracy", "0,1.0,", "1,0.9,", "2,0.7,", "3,0.6,0.5"]  # step 2 once: the resumed run's
    assert not (tmp_path / "metrics.before-resume.csv").exists()
