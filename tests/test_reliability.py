"""Cross-cutting end to end (runner, run directory, checkpoints, checks): no run can damage another,
nothing escapes the run directory, bad files are named, crashes resume: the run-directory lock,
name checks, interrupted runs, checkpoints, the training log, provenance, fault injection. The run
directory's own functions are tested in test_rundir.py."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from adamerge.app import runner  # noqa: E402
from adamerge.app.config import load_recipe, save_recipe  # noqa: E402
from adamerge.objectives.entropy import Entropy  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """datasets' cache inside the test's folder (it would write to ~/.cache otherwise)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.fixture
def quiet(zoo, recipe_dict):
    """A tiny fit recipe on the text zoo that writes no plots or merged model (fast): ``quiet(out, name, **sections)``."""

    def recipe(out, name="run", **sections):
        sections.setdefault("export", {"plot": False, "merged_model": False, "mergekit": False})
        return load_recipe(recipe_dict(zoo, out, name=name, **sections))

    return recipe


# ---------------------------------------------------------------------- the run-directory lock


def test_a_second_run_refuses_while_another_process_holds_the_directory_and_takes_over_a_stale_lock(quiet, tmp_path):
    work_dir = tmp_path / "run.partial"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom adamerge.app.rundir import run_lock\n"
         "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)", str(work_dir)],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FileExistsError, match=rf"in use by a live run \(PID {holder.pid} on {socket.gethostname()}\)"):
            runner.fit(quiet(tmp_path))
        assert sorted(p.name for p in work_dir.iterdir()) == ["lock"]  # the live run's folder is untouched
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed run leaves its lock behind
        holder.wait()
    assert (work_dir / "lock").exists()
    result = runner.fit(quiet(tmp_path))  # the stale lock is taken over
    assert (result.run_dir / "coefficients.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "hf-cache") == ["run"]


def test_the_lock_is_released_when_a_run_fails(quiet, tmp_path):
    bad = quiet(tmp_path, coefficients={"granularity": "layer", "init": str(tmp_path / "missing.safetensors")})
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):  # fails inside the run, after the lock
        runner.fit(bad)
    assert not (tmp_path / "run.partial" / "lock").exists()


# ---------------------------------------------------------------------- interrupted runs


def test_a_partial_run_without_a_checkpoint_is_restarted_not_refused(quiet, tmp_path):
    work_dir = tmp_path / "run.partial"
    save_recipe(quiet(tmp_path, optimizer={"lr": 0.5}), work_dir / "recipe.yaml")  # a failed earlier attempt
    (work_dir / "metrics.csv").write_text("stale\n")
    recipe = quiet(tmp_path)
    result = runner.fit(recipe)
    assert load_recipe(result.run_dir / "recipe.yaml") == recipe
    assert (result.run_dir / "metrics.csv").read_text() != "stale\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "hf-cache") == ["run"]


def test_a_checkpoint_of_a_different_recipe_is_refused_naming_the_keys(quiet, tmp_path):
    work_dir = tmp_path / "run.partial"
    save_recipe(quiet(tmp_path, optimizer={"lr": 0.5}), work_dir / "recipe.yaml")
    (work_dir / "checkpoints").mkdir()
    (work_dir / "checkpoints" / "last.ckpt").write_bytes(b"a checkpoint of that recipe")
    with pytest.raises(ValueError, match=r"different recipe \(differing: optimizer\.lr\)"):
        runner.fit(quiet(tmp_path))
    assert (work_dir / "checkpoints" / "last.ckpt").exists() and not (work_dir / "lock").exists()


# ---------------------------------------------------------------------- names and paths


@pytest.mark.parametrize("name", ["/any/dir/x", "../../x", "a/b", "a\\b", "..", ".", "a..b", "", "tâche", "a b"])
def test_unsafe_task_and_expert_names_are_refused_where_they_enter(name, tmp_path):
    from adamerge.app.config import load_recipe as load

    for section in ({"tasks": {name: {}}}, {"experts": {name: "x"}}):
        with pytest.raises(ValueError, match=rf"problem\.{next(iter(section))} name {re.escape(repr(name))} is not allowed"):
            load({"output_dir": str(tmp_path), "problem": {"kind": "digits", **section}})
    assert sorted(tmp_path.iterdir()) == []


def test_safe_names_pass():
    from adamerge.app.checks import check_name

    for name in ("sst2", "mnli-m", "task_1.v2", "A.b-c_d"):
        assert check_name(name) == name


def bad_names_builder(config):
    """A dotted-path builder that names its own tasks (as text_zoo or a user's builder does)."""
    from torch import nn

    from adamerge.app.problems.problem import MergeProblem

    return MergeProblem(pretrained=nn.Linear(2, 2), experts={"/tmp/x": {}}, tasks={"/tmp/x": None}, calibration={})


def test_names_a_builder_returns_are_checked_too():
    from adamerge.app.config import ProblemConfig
    from adamerge.app.problems import build_problem

    with pytest.raises(ValueError, match=r"test_reliability:bad_names_builder.*task name '/tmp/x' is not allowed"):
        build_problem(ProblemConfig(kind="test_reliability:bad_names_builder"))


# ---------------------------------------------------------------------- checkpoints

TRAINER = {"max_steps": 6, "batch_size": 4, "checkpoint_every_n_steps": 2, "progress_bar": False,
           "log_every_n_steps": 1, "accelerator": "cpu"}


def test_a_failed_checkpoint_write_leaves_the_previous_one_whole_and_the_run_resumes(quiet, tmp_path, monkeypatch, capsys):
    import torch
    from safetensors.torch import load_file

    from adamerge.io import checkpoints

    straight = runner.fit(quiet(tmp_path, name="straight", trainer=TRAINER))
    real_fsync, calls = os.fsync, []

    def disk_full_on_the_second_checkpoint(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(checkpoints.os, "fsync", disk_full_on_the_second_checkpoint)
    recipe = quiet(tmp_path, trainer=TRAINER)
    with pytest.raises(OSError, match="No space left"):
        runner.fit(recipe)
    monkeypatch.setattr(checkpoints.os, "fsync", real_fsync)
    folder = tmp_path / "run.partial" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]  # no half-written temporary file
    assert checkpoints.load_checkpoint(folder / "last.ckpt")["global_step"] == 2

    # a damaged last.ckpt is named; with an earlier good checkpoint the run resumes from it
    (folder / "step2.ckpt").write_bytes((folder / "last.ckpt").read_bytes())
    (folder / "last.ckpt").write_bytes(b"")
    capsys.readouterr()
    resumed = runner.fit(recipe)
    out = capsys.readouterr().out
    assert f"checkpoint {folder / 'last.ckpt'}: cannot read it: EOFError: the file is empty" in out
    assert "resuming from the earlier step2.ckpt instead" in out
    a = load_file(str(straight.run_dir / "coefficients.safetensors"))
    b = load_file(str(resumed.run_dir / "coefficients.safetensors"))
    assert torch.equal(a["raw"], b["raw"])


def test_a_corrupt_last_checkpoint_is_named_in_one_line(quiet, tmp_path):
    from adamerge.io.checkpoints import UnreadableInput

    recipe = quiet(tmp_path)
    last = tmp_path / "run.partial" / "checkpoints" / "last.ckpt"
    save_recipe(recipe, tmp_path / "run.partial" / "recipe.yaml")
    last.parent.mkdir()
    for damaged, cause in ((b"", "EOFError: the file is empty or cut short"), (b"PK\x03\x04 cut", "RuntimeError")):
        last.write_bytes(damaged)
        with pytest.raises(UnreadableInput) as error:
            runner.fit(recipe)
        message = str(error.value)
        assert "\n" not in message and message.startswith(f"checkpoint {last}: cannot read it: {cause}")
        assert message.endswith("delete it to start this run over")


def test_a_planted_pickle_checkpoint_runs_no_code_even_when_the_environment_asks(quiet, tmp_path, monkeypatch):
    import torch

    from adamerge.io.checkpoints import UnreadableInput
    from adamerge.learning.learner import CheckpointFiles

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    recipe = quiet(tmp_path)
    last = tmp_path / "run.partial" / "checkpoints" / "last.ckpt"
    save_recipe(recipe, tmp_path / "run.partial" / "recipe.yaml")
    last.parent.mkdir()
    torch.save({"state_dict": {}, "global_step": Payload()}, last)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UnreadableInput, match=r"refused \(weights_only\) so that no pickled code runs \(.*GLOBAL posix\.mkdir"):
        runner.fit(recipe)
    with pytest.raises(UnreadableInput, match="no pickled code runs"):  # Lightning's own resume path
        CheckpointFiles().load_checkpoint(last, weights_only=False)
    assert not marker.exists()


# ---------------------------------------------------------------------- labels


def test_labels_outside_a_head_are_refused_before_training_naming_the_task_and_value(zoo, recipe_dict, tmp_path):
    rows = (zoo / "data" / "a" / "test.jsonl").read_text().splitlines()
    folder = tmp_path / "data-a"
    folder.mkdir()
    (folder / "test.jsonl").write_text("\n".join(rows[:-1] + ['{"text": "the cat", "label": 2}']) + "\n")
    recipe = recipe_dict(zoo, tmp_path, export={"plot": False})
    recipe["problem"]["tasks"]["a"]["calibration"] = {"path": str(folder)}
    with pytest.raises(ValueError, match=r"task 'a': calibration label 2 is outside its head's 2 classes \(0\.\.1\)"):
        runner.fit(load_recipe(recipe))
    assert not (tmp_path / "run.partial" / "checkpoints").exists()  # refused before any training


# ---------------------------------------------------------------------- the training log


def test_the_training_log_survives_resumes(quiet, crash, tmp_path):
    import csv

    def log(run_dir):
        with (run_dir / "metrics.csv").open(newline="") as handle:
            return [(row["step"], row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]

    straight = runner.fit(quiet(tmp_path, name="straight", trainer=TRAINER))
    recipe = quiet(tmp_path, trainer=TRAINER)
    for crash_after in (2 * 3 + 1, 2 * 2 + 1):  # two tasks per step: dies in step 4 (checkpoint at 2), then in step 5 (at 4)
        crash.arm(Entropy, "forward", after=crash_after)
        with pytest.raises(crash.error):
            runner.fit(recipe)
    crash.disarm()
    resumed = runner.fit(recipe)
    assert [step for step, _ in log(straight.run_dir)] == [str(s) for s in range(6)]
    assert log(resumed.run_dir) == log(straight.run_dir)  # every step once, with the same losses


# ---------------------------------------------------------------------- provenance


def test_inputs_json_records_every_input_and_eval_warns_when_one_changed(zoo, recipe_dict, tmp_path):
    import hashlib
    import json
    import shutil

    from adamerge.io.checkpoints import record_inputs
    from adamerge.core.coefficients import MergeCoefficients

    data = tmp_path / "data-a"
    shutil.copytree(zoo / "data" / "a", data)
    recipe = recipe_dict(zoo, tmp_path, export={"plot": False, "merged_model": False, "mergekit": False})
    recipe["problem"]["tasks"]["a"].update(calibration={"path": str(data)}, evaluation={"path": str(data)})
    result = runner.fit(load_recipe(recipe))
    inputs = json.loads((result.run_dir / "inputs.json").read_text())
    roles = {Path(file).relative_to(zoo if Path(file).is_relative_to(zoo) else tmp_path).as_posix(): entry["role"]
             for file, entry in inputs.items()}
    assert roles["data-a/test.jsonl"] == "task 'a' data" and roles["data/b/test.jsonl"] == "task 'b' data"
    assert roles["zoo/a/model.safetensors"] == "expert 'a'" and roles["zoo/b/config.json"] == "expert 'b'"
    assert roles["base/model.safetensors"] == "pretrained"
    for file, entry in inputs.items():
        content = Path(file).read_bytes()
        assert entry["size"] == len(content) and entry["sha256"] == hashlib.sha256(content).hexdigest()

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unchanged inputs: no warning
        runner.evaluate_run(result.run_dir)
    (data / "test.jsonl").write_text((data / "test.jsonl").read_text().replace('"label": 1', '"label": 0'))
    with pytest.warns(UserWarning, match=rf"task 'a' data {re.escape(str(data / 'test.jsonl'))} changed since the run"):
        runner.evaluate_run(result.run_dir)

    read = record_inputs()  # initial coefficients are inputs too
    MergeCoefficients.load(result.run_dir / "coefficients.safetensors")
    assert read == {str((result.run_dir / "coefficients.safetensors").resolve()): "coefficients"}


# ---------------------------------------------------------------------- fault injection


@pytest.mark.slow
def test_a_fit_killed_at_random_moments_resumes_to_the_uninterrupted_coefficients(zoo, recipe_dict, quiet, tmp_path):
    """SIGKILL at up to 10 random moments (start-up, training, checkpoint writes, export), a
    rerun after each: the finished run holds bit-identical coefficients and is complete, and
    no half-written file is left beside it."""
    import random
    import time

    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    sections = {"trainer": {"max_steps": 40, "batch_size": 4, "checkpoint_every_n_steps": 1, "progress_bar": False,
                            "log_every_n_steps": 1, "accelerator": "cpu"}, "export": {"plot": False}}
    reference = runner.fit(quiet(tmp_path / "reference", **sections))
    out = tmp_path / "killed"
    path = tmp_path / "killed.yaml"
    OmegaConf.save(OmegaConf.create(recipe_dict(zoo, out, **sections)), path)
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}
    rng = random.Random(0)
    kills = 0
    while kills < 10 and not (out / "run").exists():
        process = subprocess.Popen([sys.executable, "-m", "adamerge", "fit", str(path)], cwd=tmp_path, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(1.0, 7.0))
        if process.poll() is None:
            process.kill()
            kills += 1
        process.communicate(timeout=60)
    if not (out / "run").exists():
        finished = subprocess.run([sys.executable, "-m", "adamerge", "fit", str(path)], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=600)
        assert finished.returncode == 0, finished.stderr[-2000:]
    assert kills >= 3  # the moments were inside the run, not all after it
    got = load_file(str(out / "run" / "coefficients.safetensors"))
    want = load_file(str(reference.run_dir / "coefficients.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    for name in ("recipe.yaml", "coefficients.json", "eval.json", "metrics.csv", "inputs.json", "merged/config.json"):
        assert (out / "run" / name).exists(), name
    assert sorted(p.name for p in out.iterdir()) == ["run"]  # no .partial, no staging folder left
