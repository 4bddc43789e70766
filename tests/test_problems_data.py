"""The one loader every problem kind reads its tasks' data with (adamerge.app.problems.data):
calibration rows only where a task names data, unlabelled; evaluation rows only where it has an
evaluation (or validation) section, labelled; each split read as the recipe says and prepared by the kind.
(``load_table`` itself is tested in test_data.py.)"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("datasets")

from adamerge.app.config import DataSourceConfig, ProblemConfig, TaskConfig  # noqa: E402
from adamerge.app.problems.data import has_data, load_task_data  # noqa: E402


def write_rows(path, n):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": f"row {i}", "label": i % 2}) + "\n" for i in range(n)))
    return path


def test_each_task_gets_the_splits_it_names_prepared_by_the_kind(tmp_path):
    write_rows(tmp_path / "a" / "train.jsonl", 10)
    write_rows(tmp_path / "a" / "test.jsonl", 6)
    write_rows(tmp_path / "c.jsonl", 5)
    tasks = {
        "a": TaskConfig(calibration=DataSourceConfig(path=str(tmp_path / "a"), split="train", max_samples=4, shuffle=True),
                        evaluation=DataSourceConfig(path=str(tmp_path / "a"))),
        "b": TaskConfig(expert="b-only"),  # an expert merged without data
        "c": TaskConfig(evaluation=DataSourceConfig(path=str(tmp_path / "c.jsonl"), skip=2),
                        validation=DataSourceConfig(path=str(tmp_path / "a"), split="train", skip=7)),
    }
    calls = []

    def prepare(table, name, task, labelled):
        calls.append((name, labelled, task is tasks[name]))
        return [row["text"] for row in table]

    calibration, evaluation, validation = load_task_data(ProblemConfig(tasks=tasks, seed=3), prepare)
    assert calls == [("a", False, True), ("a", True, True), ("c", True, True), ("c", True, True)]
    assert sorted(calibration) == ["a"] and sorted(evaluation) == ["a", "c"]
    assert evaluation == {"a": [f"row {i}" for i in range(6)], "c": ["row 2", "row 3", "row 4"]}
    assert validation == {"c": ["row 7", "row 8", "row 9"]}  # labelled, only where a task names it
    assert len(calibration["a"]) == 4 and set(calibration["a"]) <= {f"row {i}" for i in range(10)}
    again = load_task_data(ProblemConfig(tasks=tasks, seed=3), prepare)[0]
    other = load_task_data(ProblemConfig(tasks=tasks, seed=4), prepare)[0]
    assert again == calibration and other != calibration  # the shuffle follows problem.seed


def test_has_data_is_a_path_or_a_dataset_name():
    assert not has_data(DataSourceConfig())
    assert has_data(DataSourceConfig(path="x")) and has_data(DataSourceConfig(dataset="glue"))


def test_a_missing_split_names_the_task_and_folder(tmp_path):
    (tmp_path / "a").mkdir()
    tasks = {"a": TaskConfig(calibration=DataSourceConfig(path=str(tmp_path / "a"), split="train"))}
    with pytest.raises(FileNotFoundError, match=f"task 'a': no train.{{jsonl,json,csv,parquet}} in {tmp_path / 'a'}"):
        load_task_data(ProblemConfig(tasks=tasks), lambda *args: [])
