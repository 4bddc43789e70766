"""A merge problem: the models, tasks and data a recipe describes, ready to merge, and the
exporter that writes its merged model as its users open it.

Each problem kind (:mod:`adamerge.app.problems` lists them) builds a :class:`MergeProblem` with
its own :class:`Exporter` subclass; ``app.export`` only calls the exporter.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from adamerge.app.config import ProblemConfig
from adamerge.core.scope import parameter_aliases
from adamerge.io.checkpoints import UnreadableInput, WeightsSource, save_safetensors
from adamerge.learning.data import Collate, rows_to_batch
from adamerge.tasks.base import Task

T = TypeVar("T")


class Exporter:
    """Writes a merged model into a folder (``merged/``). This base class writes a plain module's
    weights; each kind's subclass overrides the steps its users need otherwise (a Hugging Face
    folder, its tokenizer or processor, per-task classifiers and heads, the config of streamed
    shards)."""

    def export(self, module: nn.Module, folder: Path, max_shard_size: int) -> None:
        """The merged model held in memory, in shards of at most ``max_shard_size`` bytes."""
        folder.mkdir(parents=True, exist_ok=True)
        self.write_model(module, folder, max_shard_size)
        self.write_preprocessor(folder)
        self.write_task_classifiers(module, folder, max_shard_size)
        self.write_heads(folder)

    def export_streamed(self, shards: Path, folder: Path) -> None:
        """A streamed run's merged model, never whole in memory: its shards in ``shards`` (one per
        stage) moved, or where names change rewritten one at a time, into ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        self.write_streamed_model(shards, folder)
        self.write_config(folder)
        self.write_preprocessor(folder)
        self.write_heads(folder)

    def write_model(self, module: nn.Module, folder: Path, max_shard_size: int) -> None:
        """The module's weights laid out as Hugging Face lays out a checkpoint, by huggingface_hub's
        shard splitter: ``model.safetensors`` when they fit one shard, else
        ``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``. safetensors stores
        shared storage once: a tied parameter is kept under its first name in ``named_parameters``
        and each alias is recorded as ``alias: name`` in the metadata; loading into the module
        (``huggingface_hub.load_torch_model(model, folder, strict=False)``) fills the alias."""
        from huggingface_hub import save_torch_state_dict

        save_torch_state_dict(module.state_dict(), folder, max_shard_size=max_shard_size,
                              shared_tensors_to_discard=list(parameter_aliases(module)))

    def write_streamed_model(self, shards: Path, folder: Path) -> None:
        """The shards under their exported names (:meth:`exported_key`), then the index."""
        from safetensors import safe_open

        from adamerge.io.shards import ShardWriter

        files = sorted(shards.glob("model-*-of-*.safetensors"))
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                keys = list(handle.keys())
                renamed = {key: self.exported_key(key) for key in keys}
                tensors = None if all(renamed[k] == k for k in keys) else {
                    renamed[k]: handle.get_tensor(k) for k in keys if renamed[k] is not None}
            if tensors is None:
                os.replace(file, folder / file.name)
            else:
                save_safetensors(tensors, folder / file.name, metadata={"format": "pt"})
        ShardWriter(folder, len(files)).finish()

    def exported_key(self, key: str) -> str | None:
        """A merged tensor's name in the exported folder (None: left out)."""
        return key

    def write_preprocessor(self, folder: Path) -> None:
        """The tokenizer or processor that turns inputs into the model's (none for a plain module)."""

    def write_task_classifiers(self, module: nn.Module, folder: Path, max_shard_size: int) -> None:
        """One complete model per task beside the merged one, where a kind has them."""

    def write_heads(self, folder: Path) -> None:
        """The tasks' own heads, where a kind keeps them outside the merged model."""

    def write_config(self, folder: Path) -> None:
        """What accompanies streamed shards for ``from_pretrained`` (a Hugging Face config)."""


@dataclass
class MergeProblem:
    """Everything needed to merge, learn, evaluate and export, however it was described."""

    pretrained: nn.Module
    experts: dict[str, WeightsSource]
    tasks: dict[str, Task]
    calibration: dict[str, Sequence]
    evaluation: dict[str, Sequence] = field(default_factory=dict)
    validation: dict[str, Sequence] = field(default_factory=dict)  # labelled rows a search scores (objective accuracy)
    collate: Collate | Mapping[str, Collate] = rows_to_batch
    include: list[str] | None = None
    exclude: list[str] | None = None
    exporter: Exporter = field(default_factory=Exporter)  # writes the merged model (app.export calls it)
    description: dict[str, Any] = field(default_factory=dict)  # base/experts/kind for model cards
    # streamed problems (``build_problem(..., streamed=True)``): ``pretrained`` is a skeleton on ``meta``
    pretrained_weights: Mapping[str, Any] | None = None  # its checkpoint, read lazily


# ---------------------------------------------------------------------- what every kind checks


def require(config: ProblemConfig, *what: str) -> None:
    if "pretrained" in what and not config.pretrained:
        raise ValueError(f"problem kind {config.kind!r} needs 'problem.pretrained'")
    if "tasks" in what and not config.tasks:
        raise ValueError(f"problem kind {config.kind!r} needs at least one entry in 'problem.tasks'")
    if "experts" in what:
        missing = [name for name, task in config.tasks.items() if not task.expert]
        if missing:
            raise ValueError(f"problem kind {config.kind!r}: task(s) {missing} need an 'expert'")


def experts_of(config: ProblemConfig) -> dict[str, str]:
    experts = {name: task.expert for name, task in config.tasks.items() if task.expert}
    for name, path in config.experts.items():
        if name in experts:
            raise ValueError(f"expert {name!r} is named both in problem.tasks and problem.experts")
        experts[name] = path
    return experts


def load_pretrained(pretrained: str, load: Callable[[str], T]) -> T:
    """``load(pretrained)`` (a model, tokenizer or processor read with ``from_pretrained``), with a
    missing or unreadable pretrained model named in one line with its role and path. A name that is
    no local path may be a Hugging Face hub id (``org/name``); one that cannot be is missing. (The
    run directory records the base model's files among its inputs itself.)"""
    path = Path(pretrained).expanduser()
    if not path.exists() and (str(pretrained).count("/") > 1 or str(pretrained).startswith((".", "/", "~"))):
        raise FileNotFoundError(f"pretrained model {pretrained} does not exist")
    try:
        return load(str(path) if path.exists() else pretrained)
    except (FileNotFoundError, UnreadableInput):
        raise
    except Exception as error:  # transformers' errors for a folder it cannot open, or a hub id it cannot find
        cause = (str(error).strip().splitlines() or [""])[0]
        raise UnreadableInput(f"pretrained model {pretrained}: cannot read it: {type(error).__name__}: {cause}") from error
