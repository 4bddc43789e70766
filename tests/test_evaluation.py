"""The collapse diagnostics the README's analysis rests on, against values computed by hand:
prediction histogram, mean per-sample entropy, entropy of the mean prediction, accuracy; the
Lightning test run that computes them (same numbers as one plain pass over the rows, logged to
the Trainer's loggers); and the label check before training."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from adamerge.core.merged import FunctionalModel
from adamerge.learning.data import CalibrationData
from adamerge.learning.evaluation import check_labels, evaluate
from adamerge.tasks.base import HeadTask, TaskOutput

# two batches of fixed logits (the identity backbone hands the inputs through as logits)
LOGITS = [torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 1.0]]), torch.tensor([[3.0, 0.0]])]
LABELS = [torch.tensor([0, 1, 1]), torch.tensor([0])]


def logit_rows() -> list[dict]:
    """The rows of LOGITS and LABELS, one dict each; batches of 3 give back LOGITS' two batches."""
    return [{"x": x, "label": int(y)} for xs, ys in zip(LOGITS, LABELS) for x, y in zip(xs, ys)]


def evaluation_data(datasets: dict, batch_size: int = 3) -> CalibrationData:
    return CalibrationData({}, evaluation=datasets, eval_batch_size=batch_size)


def _entropy(p):
    return -sum(x * math.log(x) for x in p if x > 0)


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_histogram_entropies_and_accuracy_equal_the_hand_computed_values():
    model = FunctionalModel(nn.Identity())
    task = HeadTask("t", input_key="x")
    result = evaluate(model, {"t": task}, evaluation_data({"t": logit_rows()}), params={})["t"]
    rows = [r.tolist() for b in LOGITS for r in b]
    probabilities = [_softmax(r) for r in rows]
    mean = [sum(p[c] for p in probabilities) / 4 for c in range(2)]
    assert result["histogram"] == [3, 1]  # argmax: 0, 0, 1, 0
    assert result["samples"] == 4
    assert result["accuracy"] == pytest.approx(3 / 4)  # right: rows 0, 2, 3
    assert result["entropy"] == pytest.approx(sum(_entropy(p) for p in probabilities) / 4, rel=1e-6)
    assert result["mean_prediction_entropy"] == pytest.approx(_entropy(mean), rel=1e-6)
    assert result["max_entropy"] == pytest.approx(math.log(2))
    labels = [0, 1, 1, 0]
    assert result["loss"] == pytest.approx(-sum(math.log(p[y]) for p, y in zip(probabilities, labels)) / 4, rel=1e-6)
    assert "perplexity" not in result  # a classifier's rows are not tokens


def test_language_model_tasks_report_perplexity_of_their_tokens():
    class TokenTask(HeadTask):
        def forward(self, merged, params, batch, hidden_layers=()):
            logits = batch["x"]
            return TaskOutput(logits, labels=batch["labels"], sample_rows=torch.tensor([logits.shape[0]]))

    data = evaluation_data({"lm": logit_rows()})
    result = evaluate(FunctionalModel(nn.Identity()), {"lm": TokenTask("lm")}, data, params={})["lm"]
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


def test_a_collapsed_task_shows_one_spike_and_a_near_zero_mean_prediction_entropy():
    model = FunctionalModel(nn.Identity())
    confident = torch.tensor([[20.0, 0.0, 0.0]] * 6)
    data = evaluation_data({"t": [{"x": row} for row in confident]})
    result = evaluate(model, {"t": HeadTask("t", input_key="x")}, data, params={})["t"]
    assert result["histogram"] == [6, 0, 0] and "accuracy" not in result
    assert result["mean_prediction_entropy"] / result["max_entropy"] < 1e-6


def test_labels_outside_the_head_are_refused_before_training_naming_the_task_and_value():
    class Data:
        calibration = {"t": [{"label": 0}, {"label": 2}]}
        evaluation = {}

        def calibration_batches(self, name, batch_size):
            yield {"x": torch.zeros(1, 2)}

        def evaluation_batches(self, name, batch_size):
            return iter(())

    with pytest.raises(ValueError, match=r"task 't': calibration label 2 is outside its head's 2 classes \(0\.\.1\)"):
        check_labels(FunctionalModel(nn.Linear(2, 2)), {"t": HeadTask("t", input_key="x")}, Data())


def plain_pass(merged, task, dataset, params) -> dict:
    """Every diagnostic from one forward over all the task's rows at once, by plain tensor arithmetic."""
    with torch.no_grad():
        batch = {"x": torch.stack([r["x"] for r in dataset]), "labels": torch.tensor([r["label"] for r in dataset])}
        logits = task(merged, params, batch).logits
    p = logits.softmax(-1)
    mean = p.mean(0)
    return {
        "samples": len(dataset),
        "entropy": float(-(p * p.log()).sum(-1).mean()),
        "mean_prediction_entropy": float(-(mean * mean.log()).sum()),
        "max_entropy": math.log(logits.shape[-1]),
        "accuracy": float((logits.argmax(-1) == batch["labels"]).float().mean()),
        "loss": float(nn.functional.cross_entropy(logits, batch["labels"])),
        "histogram": torch.bincount(logits.argmax(-1), minlength=logits.shape[-1]).tolist(),
    }


@pytest.mark.parametrize("which", ["merge", "experts"])
def test_the_lightning_evaluation_equals_one_plain_pass_over_the_rows(tiny_merge, assert_same_results, which):
    merged, tasks, data = tiny_merge()
    params = None if which == "merge" else merged.expert_parameters
    found = evaluate(merged, tasks, data, params=params)
    expected = {
        name: plain_pass(merged, tasks[name], data.evaluation[name],
                         merged.merged_parameters() if params is None else params(name))
        for name in tasks
    }
    assert_same_results(found, expected)
    if which == "experts":  # each task ran with its own expert: the numbers differ from the merge's
        assert found["a"]["entropy"] != pytest.approx(plain_pass(merged, tasks["a"], data.evaluation["a"],
                                                                 merged.merged_parameters())["entropy"])


def test_the_results_reach_the_trainers_loggers(tiny_merge, tmp_path):
    merged, tasks, data = tiny_merge()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=CSVLogger(tmp_path, name="", version=""),
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    results = evaluate(merged, tasks, data, trainer=trainer)
    logged = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert len(logged) == 1
    for name, result in results.items():
        for key in ("accuracy", "loss", "entropy", "mean_prediction_entropy", "samples"):
            assert float(logged[0][f"eval/{name}/{key}"]) == pytest.approx(result[key], rel=1e-6)
        assert f"eval/{name}/histogram" not in logged[0]  # a list: in the results, not the scalar log
        assert float(trainer.callback_metrics[f"eval/{name}/accuracy"]) == pytest.approx(result["accuracy"], rel=1e-6)
    assert not [key for key in trainer.callback_metrics if not key.startswith("eval/")]  # the results were taken out


def test_a_task_without_evaluation_rows_is_named():
    with pytest.raises(ValueError, match=r"task 't': no evaluation rows"):
        evaluate(FunctionalModel(nn.Identity()), {"t": HeadTask("t", input_key="x")}, evaluation_data({"t": []}), params={})
