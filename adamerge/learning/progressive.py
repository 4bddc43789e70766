"""Progressive layer-wise distillation: learn merge coefficients one block at a time.

ProDistill (Xu et al., "Scalable Model Merging with Progressive Layer-wise Distillation",
ICML 2025, arXiv 2502.12706). For every stage ℓ in order (embeddings, each transformer block,
then what follows), block ℓ's coefficients minimise, over a few unlabelled samples per task,

    Σ_k w_k · MSE( f_ℓ(θ_merged^ℓ; X_merged,k^(ℓ-1)),  f_ℓ(θ_k^ℓ; X_k^(ℓ-1)) )

where ``X_merged,k`` are the merged model's own features on task k's inputs and ``X_k`` expert
k's own features; then block ℓ is fixed, both feature sets move one block forward and the next
block trains. Features are cached, so a stage costs one block's forward and backward, and
only that stage's task vectors are ever in memory (read from the experts' checkpoints when
the stage starts). The paper's defaults: element-wise coefficients from 0.3, Adam with
lr 0.01, 50 epochs per layer over 64 samples per task in batches of 16, one task per batch.
Its NLU code keeps the embeddings at task arithmetic (0.3): a recipe does that with
``coefficients.freeze``. The last stage compares the task's outputs (the expert's head on the
merged features against the expert on its own), as MSE on the logits.

The coefficients are one object for the whole model (any layout but ``task``, whose single
slot spans every block), shared by the per-stage :class:`~adamerge.core.merged.MergedModel`; a
stage's optimiser moves only the slots that stage owns.

Streamed (``weights=``, see :mod:`adamerge.core.skeleton`): the pretrained module is a skeleton
with its parameters on ``meta``, and a stage's tensors are read from the checkpoint when it
starts and dropped when it ends, so at any moment only one stage's base tensors, its K task
vectors, its optimiser state and the cached features are in memory; each stage's merged
tensors go to a :class:`~adamerge.io.shards.ShardWriter` as soon as the stage is done.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor

from adamerge.tasks import blocks as B
from adamerge.io.checkpoints import WeightsSource, reading, save_safetensors
from adamerge.core.element import ElementCoefficients
from adamerge.core.merged import FunctionalModel, MergedModel
from adamerge.io.shards import FeatureFiles, ShardWriter
from adamerge.learning.optimizers import OPTIMIZERS, build_optimizer
from adamerge.io.terminal import progress_bar
from adamerge.core.skeleton import StreamedModel
from adamerge.core.scope import parameter_aliases
from adamerge.core.task_vectors import TaskVectors
from adamerge.tasks.base import Task



@dataclass
class ProgressiveResult:
    """The learned coefficients, the merged tensors (merge scope, by name; empty when streamed:
    they went to the shard writer) and each stage's log."""

    coefficients: object
    merged: dict[str, Tensor]
    history: list[dict] = field(default_factory=list)


def masked_mse(output: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
    """Mean squared error over valid positions (``mask``: ``[B, T]``, for ``[B, T, ...]`` features)."""
    squared = (output.float() - target.float()).pow(2)
    if mask is None or squared.dim() < 2 or tuple(squared.shape[:2]) != tuple(mask.shape):
        return squared.mean()
    weights = mask.to(squared.dtype).view(*mask.shape, *([1] * (squared.dim() - 2))).expand_as(squared)
    return (squared * weights).sum() / weights.sum().clamp(min=1)


class ProgressiveDistiller:
    """Trains ``coefficients`` stage by stage (see the module docstring).

    ``batches[task]``: that task's calibration batches (a few, fixed). ``checkpoint`` (a
    path): after each stage the coefficients and the stage reached are saved there
    atomically, and a rerun resumes after the last finished stage, exactly.
    ``weights``: stream (the module docstring): ``pretrained`` is a skeleton built under
    :func:`~adamerge.core.skeleton.parameters_on_meta` and ``weights`` its checkpoint, read lazily.
    ``writer``: every stage's tensors (merged or not) are written to it as the stage ends.
    ``features_dir``: cached features live in memory-mapped files there instead of memory.
    ``low_rank``: LoRA experts' task vectors stay factored (``TaskVectors.from_models``).
    ``stage_vectors(vectors, pretrained, include)``: a stage's task vectors transformed before its
    merge, e.g. a data-free start's update put first (:func:`adamerge.app.builders.stage_start`).
    ``device``: where the stage's tensors, task vectors, coefficients and batches live.
    """

    def __init__(
        self,
        pretrained: torch.nn.Module,
        experts: Mapping[str, WeightsSource],
        tasks: Mapping[str, Task],
        batches: Mapping[str, Sequence[dict]],
        coefficients,
        *,
        keys: Sequence[str],
        dtype: str = "float32",
        low_rank: bool = True,
        epochs: int = 50,
        lr: float = 0.01,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        task_weights: Mapping[str, float] | None = None,
        seed: int = 0,
        checkpoint: str | Path | None = None,
        progress: bool = True,
        weights: Mapping[str, Tensor] | None = None,
        writer: ShardWriter | None = None,
        features_dir: str | Path | None = None,
        device: torch.device | str = "cpu",
        stage_vectors: Callable[[TaskVectors, torch.nn.Module, list[str]], TaskVectors] | None = None,
    ):
        if coefficients.layout.granularity == "task":
            raise ValueError(
                "progressive learning trains one block at a time: task-wise coefficients span every block; "
                "use granularity layer, chunk, group (within blocks) or element"
            )
        if optimizer not in OPTIMIZERS:  # before any stage is read
            raise ValueError(f"unknown optimizer {optimizer!r}; use one of {sorted(OPTIMIZERS)}")
        self.device = torch.device(device)
        if weights is None:
            pretrained.to(self.device)
        self.model = FunctionalModel(pretrained)
        config = getattr(self.model.backbone, "config", None)
        if config is not None and getattr(config, "use_cache", False):
            config.use_cache = False  # a KV cache would carry state from one block call to the next
        self.pretrained, self.experts, self.tasks = pretrained, dict(experts), dict(tasks)
        for task in self.tasks.values():
            task.to(self.device)
        self.batches = {name: [_on_device(b, self.device) for b in bs] for name, bs in batches.items()}
        coefficients.to(self.device)
        self.coefficients, self.keys, self.dtype, self.low_rank = coefficients, list(keys), dtype, low_rank
        self.epochs, self.lr, self.optimizer, self.weight_decay = epochs, lr, optimizer, weight_decay
        self.task_weights = {t: float((task_weights or {}).get(t, 1.0)) for t in self.tasks}
        self.seed, self.progress = seed, progress
        self.log: list[dict] = []  # the training log: each epoch's mean loss, by step over the whole run
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        unmatched = sorted(set(self.tasks) - set(self.experts))
        if unmatched:
            raise KeyError(f"progressive distillation needs an expert per task; no expert named {unmatched[0]!r}")
        if weights is not None and isinstance(coefficients, ElementCoefficients):
            raise ValueError(
                "streamed learning keeps the whole model's coefficients in memory: element-wise ones are as large "
                "as the task vectors; use granularity layer, chunk or group"
            )
        self.stage_vectors = stage_vectors
        self.streamed = StreamedModel(pretrained, weights, scope=self.keys, device=self.device) if weights is not None else None
        self.writer = writer
        self.features = FeatureFiles(features_dir) if features_dir is not None else None
        self.prefix = B.find_blocks(self.model.backbone)
        self._find_stages()
        self._check_slots()

    def _find_stages(self) -> None:
        """The stages, from one forward with the blocks passed through (the weights outside the
        blocks and block 0's, to see what the blocks return, are read for it)."""
        backbone, prefix = self.model.backbone, self.prefix
        first_task = next(iter(self.tasks))
        probe = lambda: self._run_task(first_task, {}, self.batches[first_task][0])  # noqa: E731
        names = [parameter_aliases(backbone).get(n, n) for n in backbone.state_dict(keep_vars=True)]
        needed = [n for n in dict.fromkeys(names) if B.block_of_key(n, prefix) in (None, 0)]
        with self._resident(needed):
            call = B.capture_block_input(backbone, prefix, probe)
            self._as_tuple = B.block_returns_tuple(backbone, prefix, call)
            self.stages = B.split_stages(backbone, self.keys, probe, parameter_aliases(backbone), self._as_tuple)

    @contextlib.contextmanager
    def _resident(self, keys: Sequence[str], stand_ins: Sequence[str] = ()):
        """Streamed: these tensors are read into the skeleton for the context, then dropped;
        ``stand_ins`` are zeros that take no memory (computed on, then ignored)."""
        if self.streamed is None:
            yield
            return
        self.streamed.stand_in(stand_ins)
        self.streamed.materialise(keys)
        try:
            yield
        finally:
            self.streamed.release([*keys, *stand_ins])

    def _check_slots(self) -> None:
        """Every coefficient slot belongs to one stage (else a later stage would move an earlier one's)."""
        layout, owner = self.coefficients.layout, {}
        for stage in self.stages:
            for key in stage.owns:
                for slot in layout.tensor_slots[key]:
                    if owner.setdefault(slot, stage.name) != stage.name:
                        raise ValueError(
                            f"coefficient slot {layout.slot_names[slot]!r} spans stages {owner[slot]!r} and "
                            f"{stage.name!r}: progressive learning needs coefficients within one block"
                        )

    # ------------------------------------------------------------------ one stage's forward
    def _run_task(self, task: str, params: Mapping[str, Tensor], batch: dict):
        return self.tasks[task](self.model, params, batch)

    def _stage_output(self, stage: B.Stage, task: str, params, batch: dict, features: Tensor | None) -> Tensor:
        """What ``stage`` produces on one batch from ``features`` with the given tensors."""
        backbone, features = self.model.backbone, self._here(features)
        if stage.kind == "pre":
            call = B.capture_block_input(backbone, self.prefix, lambda: self._run_task(task, params, batch))
            return call.hidden()
        if stage.kind == "block":
            return B.run_block(backbone, self.prefix, stage.index, params, self._calls[task][id(batch)], features)
        outside = {k: v for k, v in params.items() if B.block_of_key(k, self.prefix) is None}
        with B.blocks_bypassed(backbone, self.prefix, features, self._as_tuple):
            return self._run_task(task, outside, batch).logits

    # ------------------------------------------------------------------ the whole run
    def run(self) -> ProgressiveResult:
        done = self._resume()
        features = {t: [(None, None) for _ in bs] for t, bs in self.batches.items()}
        merged_tensors: dict[str, Tensor] = {}
        history: list[dict] = []
        total = sum(len(bs) for bs in self.batches.values()) * self.epochs * sum(bool(self._trainable(s)) for s in self.stages[done:])
        bar = progress_bar(total, "progressive distillation", unit="step", enabled=self.progress and total > 0)
        written: set[str] = set()
        before = self.stages[0].needs  # the head stage's forward also passes through these, then drops their output
        for number, stage in enumerate(self.stages):
            stand_ins = [k for k in before if k not in stage.needs] if stage.kind == "post" else []
            with self._resident(stage.needs, stand_ins):
                if number == 0:  # every block's other arguments (masks, rotary tables), from the embeddings
                    self._calls = {t: {id(b): self._block_call(t, b) for b in bs} for t, bs in self.batches.items()}
                merged = self._stage_merge(stage)
                targets = self._expert_outputs(stage, merged, features)
                if number >= done:
                    history.append(self._train_stage(stage, merged, features, targets, bar))
                with torch.no_grad():
                    params = merged.merged_parameters()
                    owned = {k: params[k].detach().clone() for k in stage.owns}
                    if self.writer is not None:
                        self._write_stage(number, stage, owned, written)
                    if self.streamed is None:
                        merged_tensors.update(owned)
                    if number >= done:
                        self._save_checkpoint(number + 1)
                    if stage.kind != "post":
                        features = self._next_features(number, stage, params, features, targets)
                del merged, params, owned
        bar.close()
        return ProgressiveResult(self.coefficients, merged_tensors, history)

    def _here(self, features: Tensor | None) -> Tensor | None:
        """Cached features on the stage's device (memory-mapped ones are read from host memory per batch)."""
        return None if features is None else features.to(self.device, non_blocking=True)

    def _block_call(self, task: str, batch: dict) -> B.BlockCall:
        """Block 0's arguments on this batch, its hidden states dropped (each stage brings its own)."""
        call = B.capture_block_input(self.model.backbone, self.prefix, lambda: self._run_task(task, {}, batch))
        return call.without_hidden()

    def _next_features(self, number: int, stage: B.Stage, params, features, targets) -> dict:
        """Both feature sets one stage on (in memory-mapped files when asked)."""
        moved = {}
        for t, bs in self.batches.items():
            moved[t] = []
            for i, b in enumerate(bs):
                pair = (self._stage_output(stage, t, params, b, features[t][i][0]), targets[t][i])
                if self.features is not None:
                    pair = tuple(self.features.keep(x, f"{number}-{t}-{i}-{side}") for x, side in zip(pair, "me"))
                moved[t].append(pair)
        if self.features is not None and number > 0:
            self.features.drop(f"{number - 1}-")
        return moved

    def _write_stage(self, number: int, stage: B.Stage, merged: Mapping[str, Tensor], written: set[str]) -> None:
        """The stage's shard: its merged tensors and every other tensor it first reads, as stored."""
        tensors = dict(merged)
        state = self.model.backbone.state_dict(keep_vars=True)  # this stage's tensors are resident
        for key in stage.needs:
            lacking = self.streamed is not None and self.streamed.stored[key] is None  # never invented
            if key not in written and key not in tensors and not lacking:
                tensors[key] = state[key].detach()
        written.update(stage.needs)
        written.update(merged)
        self.writer.write(number, tensors)

    def _stage_merge(self, stage: B.Stage) -> MergedModel:
        """The merge of the tensors this stage reads, against the shared coefficients; only
        these tensors' task vectors are read from the experts."""
        if not stage.reads:
            return _EmptyMerge()
        include = [f"^{re.escape(k)}$" for k in stage.reads]
        vectors = TaskVectors.from_models(
            self.pretrained, self.experts, include=include, dtype=self.dtype, low_rank=self.low_rank, device=self.device
        )
        if self.stage_vectors is not None:  # e.g. a data-free start's update of these tensors, first
            vectors = self.stage_vectors(vectors, self.pretrained, include).to(device=self.device)
        return MergedModel(self.pretrained, vectors, coefficients=self.coefficients)

    @torch.no_grad()
    def _expert_outputs(self, stage, merged, features) -> dict[str, list[Tensor]]:
        """Each task's expert through this stage on its own features: the stage's targets."""
        out = {}
        for task, task_batches in self.batches.items():
            params = merged.expert_parameters(task)
            out[task] = [self._stage_output(stage, task, params, b, features[task][i][1]) for i, b in enumerate(task_batches)]
        return out

    def _owned_slots(self, stage: B.Stage) -> set[int]:
        return {s for k in stage.owns for s in self.coefficients.layout.tensor_slots[k]}

    def _trainable(self, stage: B.Stage) -> list[torch.nn.Parameter]:
        if isinstance(self.coefficients, ElementCoefficients):
            return self.coefficients.parameters_of(stage.owns)
        trains = self._owned_slots(stage) - set(self.coefficients.layout.frozen)
        return [self.coefficients.raw] if trains else []

    def _train_stage(self, stage, merged, features, targets, bar) -> dict:
        params = self._trainable(stage)
        if not params:
            return {"stage": stage.name, "steps": 0}
        keep = self._slot_keeper(stage)
        optimizer = build_optimizer(self.optimizer, params, self.lr, self.weight_decay)
        order = [(t, i) for t, bs in self.batches.items() for i in range(len(bs))]
        rng = random.Random(f"{self.seed}:{stage.name}")
        first = last = None
        for epoch in range(self.epochs):
            rng.shuffle(order)
            total = 0.0
            for task, i in order:
                batch = self.batches[task][i]
                output = self._stage_output(stage, task, merged.merged_parameters(), batch, features[task][i][0])
                loss = self.task_weights[task] * masked_mse(output, self._here(targets[task][i]), batch.get("attention_mask"))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                self.coefficients.project_()
                keep()
                total += float(loss.detach())
                bar.update(1)
            mean = total / len(order)
            first = mean if first is None else first
            steps = (self.log[-1]["step"] if self.log else 0) + len(order)
            self.log.append({"step": steps, "stage": stage.name, "train/loss": mean})
            last = mean
            bar.set_postfix(stage=stage.name, loss=f"{mean:.4g}")
        return {"stage": stage.name, "steps": self.epochs * len(order), "first_epoch_loss": first, "last_epoch_loss": last}

    def _slot_keeper(self, stage: B.Stage) -> Callable[[], None]:
        """With one ``[K, S]`` matrix for the whole model, put back every slot this stage does not own
        after each step (an optimiser step moves what weight decay or momentum touch)."""
        if isinstance(self.coefficients, ElementCoefficients):
            return lambda: None
        owned = self._owned_slots(stage)
        columns = [i for i, s in enumerate(self.coefficients.layout.trainable_slots) if s not in owned]
        if not columns:
            return lambda: None
        index = torch.tensor(columns, device=self.coefficients.raw.device)
        saved = self.coefficients.raw.detach()[:, index].clone()

        def keep() -> None:
            with torch.no_grad():
                self.coefficients.raw[:, index] = saved

        return keep

    # ------------------------------------------------------------------ resume
    def _save_checkpoint(self, stages_done: int) -> None:
        """The coefficients after ``stages_done`` stages, as safetensors (atomic; nothing pickled)."""
        if self.checkpoint is None:
            return
        state = {k: v.detach().cpu() for k, v in self.coefficients.state_dict().items()}
        stages = json.dumps([s.name for s in self.stages])
        save_safetensors(state, self.checkpoint, metadata={"stages_done": str(stages_done), "stages": stages})

    def _resume(self) -> int:
        """How many stages an interrupted run finished (their coefficients restored), else 0."""
        if self.checkpoint is None or not self.checkpoint.exists():
            return 0
        with reading("checkpoint", self.checkpoint), safe_open(str(self.checkpoint), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {k: handle.get_tensor(k) for k in handle.keys()}
        if json.loads(metadata.get("stages", "[]")) != [s.name for s in self.stages]:
            raise ValueError(f"{self.checkpoint} was written for other stages: delete it to start over")
        self.coefficients.load_state_dict(state)
        return int(metadata["stages_done"])


def _on_device(batch: dict, device: torch.device) -> dict:
    """The batch on ``device``: itself when it already is there, else a moved copy."""
    return batch if all(v.device == device for v in batch.values() if isinstance(v, Tensor)) else move_data_to_device(batch, device)


class _EmptyMerge:
    """A stage that reads no merged tensor (e.g. no pooler): nothing to merge or learn."""

    expert_names: tuple = ()

    def merged_parameters(self) -> dict:
        return {}

    def expert_parameters(self, expert) -> dict:
        return {}
