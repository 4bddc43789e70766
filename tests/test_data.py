"""Calibration data: the seeded, balanced, resumable stream; held-out rows; reading tables from disk."""

from __future__ import annotations

import json
import re

import pytest
import torch

from adamerge.app.config import DataSourceConfig
from adamerge.learning.data import (
    CalibrationData,
    MultiTaskStream,
    TaskBatches,
    ordered_batches,
    rows_to_batch,
    split_holdout,
)
from adamerge.app.problems.data import load_table


def rows(n: int) -> list[dict]:
    """Row ``i`` carries ``x = i``, so a batch shows which rows it holds."""
    return [{"x": i, "label": i % 3} for i in range(n)]


def stream(sizes=(10, 6), batch_size=4, seed=0) -> MultiTaskStream:
    names = "abcdefg"
    return MultiTaskStream(
        {names[i]: TaskBatches(names[i], rows(n), batch_size, seed=seed) for i, n in enumerate(sizes)}
    )


def take(s: MultiTaskStream, steps: int) -> list[dict]:
    iterator = iter(s)
    return [next(iterator) for _ in range(steps)]


def ids(batch) -> list[int]:
    return batch["x"].tolist()


# ---------------------------------------------------------------------- the stream


def test_collate_and_index():
    batch = TaskBatches("a", rows(5), 3, seed=1).batch(0)
    assert set(batch) == {"x", "labels", "index"}  # `label` becomes `labels`
    assert batch["index"].tolist() == ids(batch)
    assert batch["labels"].tolist() == [i % 3 for i in ids(batch)]


def test_stream_is_deterministic_from_the_seed():
    first, again, other = take(stream(seed=3), 6), take(stream(seed=3), 6), take(stream(seed=4), 6)
    for a, b in zip(first, again):
        assert ids(a["a"]) == ids(b["a"]) and ids(a["b"]) == ids(b["b"])
    assert [ids(s["a"]) for s in first] != [ids(s["a"]) for s in other]
    assert [ids(s["a"]) for s in first] != [list(range(i * 4, i * 4 + 4)) for i in range(2)]  # shuffled


def test_stream_is_balanced_one_batch_per_task_per_step():
    s = stream(sizes=(10, 6, 3), batch_size=4)
    assert len(s) == 3  # steps per epoch: enough for the largest task (ceil(10 / 4))
    for step in take(s, 7):
        assert sorted(step) == ["a", "b", "c"]
        assert all(len(batch["x"]) == 4 for batch in step.values())


@pytest.mark.parametrize("size,batch_size", [(10, 5), (10, 4), (3, 4)])
def test_every_row_once_per_epoch(size, batch_size):
    s = MultiTaskStream({"a": TaskBatches("a", rows(size), batch_size, seed=7)})
    epochs = 3
    steps = -(-epochs * size // batch_size)
    flat = [i for step in take(s, steps) for i in ids(step["a"])]
    orders = [flat[e * size : (e + 1) * size] for e in range(epochs)]
    for order in orders:
        assert sorted(order) == list(range(size))
    if size > 3:
        assert orders[0] != orders[1]  # a fresh permutation every epoch


def test_state_is_the_step_counter_and_resumes_the_exact_sequence():
    reference = take(stream(seed=5), 9)
    s = stream(seed=5)
    take(s, 4)
    state = s.state_dict()
    assert state == {"step": 4}
    resumed = stream(seed=5)
    resumed.load_state_dict(state)
    for expected, got in zip(reference[4:], take(resumed, 5)):
        assert ids(expected["a"]) == ids(got["a"]) and ids(expected["b"]) == ids(got["b"])
    assert resumed.state_dict() == {"step": 9}


@pytest.mark.parametrize("size", [12, 11])
def test_two_processes_split_the_global_batch(size):
    data = rows(size)
    single = TaskBatches("a", data, batch_size=6, seed=2)
    ranks = [TaskBatches("a", data, batch_size=3, seed=2, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].global_batch_size == 6
    for step in range(5):
        halves = [ids(r.batch(step)) for r in ranks]
        assert halves[0] + halves[1] == ids(single.batch(step))
        if size % 6 == 0:  # (a global batch straddling two epochs may repeat a row, whatever the ranks)
            assert not set(halves[0]) & set(halves[1])


# ---------------------------------------------------------------------- held-out rows


def test_holdout_split_is_deterministic_and_disjoint():
    train, held = split_holdout(20, 0.25, seed=1)
    assert (train, held) == split_holdout(20, 0.25, seed=1)
    assert len(held) == 5 and not set(train) & set(held) and sorted(train + held) == list(range(20))
    assert split_holdout(20, 0.25, seed=2)[1] != held
    assert len(split_holdout(20, 3, seed=1)[1]) == 3  # a count when >= 1
    assert split_holdout(20, 0.0, seed=1) == (list(range(20)), [])
    with pytest.raises(ValueError, match="leaves no calibration rows"):
        split_holdout(4, 4, seed=0)


def test_training_never_sees_held_out_rows_and_index_is_the_full_set():
    data = CalibrationData({"a": rows(20), "b": rows(8)}, batch_size=3, seed=4, holdout=0.25, eval_batch_size=5)
    train_a, held_a = data.splits["a"]
    assert len(held_a) == 5 and len(data.splits["b"][1]) == 2
    seen = set()
    for step in take(data.train_dataloader(), 20):
        batch = step["a"]
        assert ids(batch) == batch["index"].tolist()  # index = position in the full calibration set
        assert not set(ids(batch)) & set(held_a)
        assert not set(ids(step["b"])) & set(data.splits["b"][1])
        seen.update(ids(batch))
    assert seen == set(train_a)
    held = [i for b in data.holdout_batches("a") for i in b["index"].tolist()]
    assert held == held_a == [i for b in data.holdout_batches("a") for i in ids(b)]
    everything = list(data.calibration_batches("a"))
    assert [len(b["x"]) for b in everything] == [5, 5, 5, 5]
    assert [i for b in everything for i in b["index"].tolist()] == list(range(20))
    assert list(CalibrationData({"a": rows(4)}).holdout_batches("a")) == []


def test_per_task_collate():
    def tagged(tag):
        def collate(batch_rows):
            out = rows_to_batch(batch_rows)
            out["tag"] = tag
            return out

        return collate

    data = CalibrationData({"a": rows(4), "b": rows(4)}, collate={"a": tagged("A"), "b": tagged("B")}, batch_size=2)
    step = next(iter(data.train_dataloader()))
    assert step["a"]["tag"] == "A" and step["b"]["tag"] == "B"


def test_empty_data_errors_name_the_task():
    with pytest.raises(ValueError, match="'sst2' has no calibration data"):
        CalibrationData({"cola": rows(3), "sst2": []})
    with pytest.raises(ValueError, match="no calibration data"):
        CalibrationData({})
    with pytest.raises(ValueError, match="'mrpc' has no calibration data"):
        TaskBatches("mrpc", [], 4)
    with pytest.raises(ValueError, match="'rte' has no data"):
        list(ordered_batches("rte", [], 4))
    with pytest.raises(ValueError, match="batch_size"):
        TaskBatches("a", rows(3), 0)


# ---------------------------------------------------------------------- load_table


TABLE = [{"text": f"row {i}", "label": i % 2} for i in range(12)]


def write_jsonl(path, table=TABLE):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in table))
    return path


def texts(table) -> list[str]:
    return list(table["text"])


def test_load_table_formats(tmp_path):
    import datasets

    jsonl = write_jsonl(tmp_path / "data.jsonl")
    csv = tmp_path / "data.csv"
    csv.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in TABLE))
    parquet = tmp_path / "data.parquet"
    datasets.Dataset.from_list(TABLE).to_parquet(str(parquet))
    folder = tmp_path / "folder"
    write_jsonl(folder / "validation.jsonl", TABLE[:5])
    write_jsonl(folder / "test.jsonl", TABLE[5:])
    for path in (jsonl, csv, parquet):
        table = load_table(DataSourceConfig(path=str(path)), "t")
        assert texts(table) == [r["text"] for r in TABLE], path.suffix
        assert list(table["label"]) == [r["label"] for r in TABLE]
    assert texts(load_table(DataSourceConfig(path=str(folder), split="validation"), "t")) == [f"row {i}" for i in range(5)]
    assert texts(load_table(DataSourceConfig(path=str(folder)), "t")) == [f"row {i}" for i in range(5, 12)]


def test_load_table_shuffle_skip_max_samples(tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl"))
    plain = texts(load_table(DataSourceConfig(path=path, skip=2, max_samples=3), "t"))
    assert plain == ["row 2", "row 3", "row 4"]
    shuffled = texts(load_table(DataSourceConfig(path=path, shuffle=True), "t", seed=3))
    assert sorted(shuffled) == sorted(r["text"] for r in TABLE) and shuffled != [r["text"] for r in TABLE]
    assert shuffled == texts(load_table(DataSourceConfig(path=path, shuffle=True), "t", seed=3))
    assert shuffled != texts(load_table(DataSourceConfig(path=path, shuffle=True), "t", seed=4))
    window = texts(load_table(DataSourceConfig(path=path, shuffle=True, skip=3, max_samples=5), "t", seed=3))
    assert window == shuffled[3:8]
    assert len(load_table(DataSourceConfig(path=path, max_samples=100), "t")) == 12


def test_load_table_errors_name_task_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'qnli'.*nope\.jsonl"):
        load_table(DataSourceConfig(path=str(tmp_path / "nope.jsonl")), "qnli")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match=r"'qnli'.*validation.*folder"):
        load_table(DataSourceConfig(path=str(tmp_path / "folder"), split="validation"), "qnli")
    text = tmp_path / "data.txt"
    text.write_text("hello\n")
    with pytest.raises(ValueError, match=r"'qnli'.*data\.txt.*unsupported"):
        load_table(DataSourceConfig(path=str(text)), "qnli")
    path = str(write_jsonl(tmp_path / "d.jsonl"))
    with pytest.raises(ValueError, match=r"'qnli': no rows in .*d\.jsonl"):
        load_table(DataSourceConfig(path=path, skip=12), "qnli")
    with pytest.raises(ValueError, match="'qnli'"):
        load_table(DataSourceConfig(path=path, max_samples=0), "qnli")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"'qnli'.*empty\.jsonl"):
        load_table(DataSourceConfig(path=str(empty)), "qnli")
    with pytest.raises(ValueError, match="exactly one of"):
        load_table(DataSourceConfig(path=path, dataset="glue"), "qnli")
    with pytest.raises(ValueError, match="exactly one of"):
        load_table(DataSourceConfig(), "qnli")


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """datasets' cache inside the test's folder (it would write to ~/.cache otherwise)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.mark.parametrize("name, content, cause", [
    ("empty.jsonl", b"", "the file is empty"),
    ("blank.jsonl", b"\n\n", None),
    ("header.csv", b"text,label\n", None),
    ("cut.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n{"text": "d', r"JSON parse error: .* in row 3"),
    ("garbage.parquet", b"\x00garbage" * 40, r"ArrowInvalid: Parquet magic bytes not found .*not a parquet file"),
    ("empty.csv", b"\n", "EmptyDataError: No columns to parse"),
])
def test_unreadable_tables_are_named_in_one_line(tmp_path, datasets_cache, name, content, cause):
    from adamerge.io.checkpoints import UnreadableInput

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UnreadableInput) as error:
        load_table(DataSourceConfig(path=str(path)), "b")
    message = str(error.value)
    assert "\n" not in message
    if cause is None:
        assert message == f"task 'b': no rows in {path}"
    else:
        assert message.startswith(f"task 'b' data {path}: ")
        assert re.search(cause, message), message


def test_by_length_orders_rows_by_their_token_count_and_leaves_other_rows_alone():
    from adamerge.learning.data import by_length

    rows = [{"input_ids": [1] * n} for n in (5, 2, 7, 2)]
    assert by_length(rows, [0, 1, 2, 3]) == [1, 3, 0, 2]  # stable among equal lengths
    assert by_length(rows, [2, 0]) == [0, 2]
    plain = [{"x": 1}, {"x": 2}]
    assert by_length(plain, [1, 0]) == [1, 0]


def test_worker_threads_build_the_same_stream_and_its_state_counts_what_was_handed_out():
    """Batches built ahead by threads are the in-line stream's, in order; the state is the count of
    batches consumed (not built), so a resumed stream continues exactly."""
    tasks = {name: TaskBatches(name, [{"x": torch.tensor([float(i)])} for i in range(size)], batch_size=3, seed=1)
             for name, size in (("a", 10), ("b", 7))}
    inline, threaded = iter(MultiTaskStream(tasks)), MultiTaskStream(tasks, workers=2)
    taken = [next(iter_) for iter_ in [iter(threaded)] for _ in range(5)]
    for batch in taken:
        expected = next(inline)
        assert all(torch.equal(batch[t]["x"], expected[t]["x"]) for t in tasks)
    assert threaded.state_dict() == {"step": 5}
    resumed = MultiTaskStream(tasks, workers=2)
    resumed.load_state_dict(threaded.state_dict())
    assert torch.equal(next(iter(resumed))["a"]["x"], next(inline)["a"]["x"])


def test_pinned_batches_for_a_gpu(monkeypatch):
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self) or self)  # no GPU here to pin for
    tasks = {"a": TaskBatches("a", [{"x": torch.tensor([1.0])}] * 4, batch_size=2)}
    batch = next(iter(MultiTaskStream(tasks, pin_memory=True)))
    assert any(t is batch["a"]["x"] for t in pinned) and any(t is batch["a"]["index"] for t in pinned)
