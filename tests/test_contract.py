"""The learning contract (adamerge.learning.contract): which trainer fields a learner would ignore,
and the training log every learner writes."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from adamerge.learning.contract import COMMON_TRAINER_FIELDS, log_csv, unhonoured_trainer_fields


@dataclass
class Defaults:
    max_steps: int = 500
    batch_size: int = 16
    precision: str = "32-true"
    devices: int = 1


def test_only_fields_set_away_from_their_defaults_and_not_honoured_are_named():
    assert {"batch_size"} <= COMMON_TRAINER_FIELDS
    set_fields = Defaults(max_steps=2, batch_size=4, precision="32-true", devices=2)
    assert unhonoured_trainer_fields(frozenset({"devices"}), set_fields, Defaults()) == ["max_steps"]
    assert unhonoured_trainer_fields(frozenset({"devices", "max_steps"}), set_fields, Defaults()) == []
    assert unhonoured_trainer_fields(frozenset(), Defaults(), Defaults()) == []


def test_the_log_keeps_every_column_in_first_seen_order():
    rows = [{"step": 4, "stage": "embeddings", "train/loss": 0.5}, {"step": 8, "train/loss": 0.25, "extra": 1}]
    text = log_csv(rows)
    read = list(csv.DictReader(io.StringIO(text)))
    assert text.splitlines()[0] == "step,stage,train/loss,extra"
    assert read[1] == {"step": "8", "stage": "", "train/loss": "0.25", "extra": "1"}
