"""What data-driven merges run on: the marker, the refusals naming the task, the backbone's tensors
with an expert's swapped in, batches limited and moved, samples one at a time, and input Grams
checked against X^T X / N computed here."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adamerge.methods import METHODS
from adamerge.methods.calibration import Calibration, data_driven, input_grams, needs_calibration, rows
from adamerge.tasks.base import HeadTask


def test_data_driven_methods_are_marked_and_data_free_ones_are_not():
    marked = {name for name in METHODS if needs_calibration(METHODS.get(name))}
    assert marked == {"regmean", "regmean_plusplus", "fisher"}

    @data_driven
    def mine(pretrained, experts, *, calibration):
        return pretrained

    assert needs_calibration(mine) and not needs_calibration(lambda: None)


def make(batches=None) -> Calibration:
    backbone = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.BatchNorm1d(2)).eval()
    x = torch.arange(18.0).reshape(6, 3) / 10
    default = {"a": lambda: [{"inputs": x[:4], "tag": "first"}, {"inputs": x[4:], "tag": "second"}]}
    return Calibration(backbone, {"a": HeadTask("a"), "b": HeadTask("b")}, default if batches is None else batches)


def test_check_names_the_expert_without_a_task_and_the_task_without_data():
    calibration = make()
    calibration.check(["a"], "regmean")
    with pytest.raises(ValueError, match=r"^task 'b' has no calibration data \(problem.tasks.b.calibration\): fisher"):
        calibration.check(["a", "b"], "fisher")
    with pytest.raises(ValueError, match=r"^expert 'c' has no task of its name: regmean"):
        calibration.check(["c"], "regmean")


def test_params_are_every_backbone_tensor_with_the_given_ones_in_place():
    calibration = make()
    own = torch.ones(4, 3)
    params = calibration.params({"0.weight": own})
    names = {n for n, _ in calibration.backbone.named_parameters()} | {n for n, _ in calibration.backbone.named_buffers()}
    assert set(params) == names  # buffers too (BatchNorm's running stats): the backbone runs on the params alone
    assert params["0.weight"] is own and torch.equal(params["2.weight"], calibration.backbone[2].weight)


def test_inputs_are_the_first_batches_on_the_device_and_a_limit_below_one_is_refused():
    calibration = make()
    batches = list(calibration.inputs("a", 1))
    assert len(batches) == 1 and batches[0]["tag"] == "first" and batches[0]["inputs"].shape == (4, 3)
    assert len(list(calibration.inputs("a", 10))) == 2
    with pytest.raises(ValueError, match="batches must be >= 1, got 0"):
        list(calibration.inputs("a", 0))
    meta = Calibration(calibration.backbone, calibration.tasks, calibration.batches, "meta")
    assert next(meta.inputs("a", 1))["inputs"].device.type == "meta"


def test_rows_slice_every_tensor_of_the_batch_size_and_keep_the_rest():
    batch = {"inputs": torch.arange(6).reshape(3, 2), "index": torch.tensor([4, 5, 6]), "scale": torch.tensor(2.0),
             "table": torch.zeros(5, 2), "name": "x"}
    split = list(rows(batch))
    assert len(split) == 3
    assert torch.equal(split[1]["inputs"], torch.tensor([[2, 3]])) and torch.equal(split[1]["index"], torch.tensor([5]))
    assert split[1]["scale"] is batch["scale"] and split[1]["table"] is batch["table"] and split[1]["name"] == "x"


def test_input_grams_are_the_mean_input_products_of_the_named_linear_modules():
    calibration = make()
    params = calibration.params({})
    grams = input_grams(calibration, "a", params, ["0", "2"], limit=2)
    x = torch.arange(18.0).reshape(6, 3) / 10
    torch.testing.assert_close(grams["0"], x.T @ x / 6)
    hidden = torch.relu(calibration.backbone[0](x)).detach()
    torch.testing.assert_close(grams["2"], hidden.T @ hidden / 6)
    one = input_grams(calibration, "a", params, ["0"], limit=1)  # only the first batch
    torch.testing.assert_close(one["0"], x[:4].T @ x[:4] / 4)
    assert not calibration.backbone[0]._forward_pre_hooks  # the hooks are gone


def test_input_grams_average_over_every_position_and_leave_out_modules_never_reached():
    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    tokens = torch.randn(3, 5, 2)  # [batch, positions, features]: every position is a row
    calibration = Calibration(Branches(), {"a": HeadTask("a")}, {"a": lambda: [{"inputs": tokens}]})
    grams = input_grams(calibration, "a", calibration.params({}), ["used", "unused"], limit=1)
    flat = tokens.reshape(-1, 2)
    assert set(grams) == {"used"}
    torch.testing.assert_close(grams["used"], flat.T @ flat / 15)
