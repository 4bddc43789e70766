"""A merged model never whole in memory: each block merged when it runs, and again in the backward.

The all-at-once learner's objectives (expert KL on a causal LM's answer tokens, entropy, ...)
need the whole model's forward, but not the whole model at once. Here every *unit* — each
transformer block, and each module with weights of its own outside the blocks (embeddings,
final norm, head) — reads its pretrained tensors and its K task vectors when it runs, merges
them at the current coefficients, runs, and drops them. Under gradients each unit runs inside
activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost";
``torch.utils.checkpoint``): the backward reads and merges the unit again, so the autograd
graph holds only the activations at unit boundaries and the coefficients, never a merged
block. The gradients are those of :class:`~adamerge.core.merged.MergedModel`; a step costs one
more forward and one more read of the weights.

The task vectors of each unit (with a data-free start's update first, computed from that
unit's tensors alone, as progressive learning does) are computed once and cached in one
safetensors file per unit, memory-mapped when the unit runs. The pretrained model is a skeleton
(:mod:`adamerge.core.skeleton`) whose tensors are read lazily from its checkpoint.

It stands in for a ``MergedModel`` in the Lightning learner: ``merged_parameters()`` and
``expert_parameters(k)`` return a marker that ``forward_with`` turns into the units' mode.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from adamerge.core.coefficients import MergeCoefficients
from adamerge.core.merged import merge_blocks, merge_into
from adamerge.core.scope import parameter_aliases
from adamerge.core.skeleton import StreamedModel, return_freed_memory
from adamerge.core.task_vectors import TaskVectors
from adamerge.io.checkpoints import WeightsSource
from adamerge.io.shards import ShardWriter
from adamerge.io.terminal import progress_bar
from adamerge.tasks.blocks import find_blocks

MERGED = "adamerge.streamed.merged"  # params marker: the coefficient values to merge at
EXPERT = "adamerge.streamed.expert"  # params marker: the index of the expert to run


@dataclass(eq=False)
class Unit:
    """A module that runs with its own tensors: ``local name -> canonical key``, the merged ones apart."""

    number: int
    name: str
    module: nn.Module
    tensors: dict[str, str]
    merged: list[str]
    cache: int = -1  # the unit whose cache file holds these task vectors (a tied head reads the embedding's)

    def path(self, local: str) -> str:
        return f"{self.name}.{local}" if self.name else local


class StreamedMergedModel(nn.Module):
    """``θ_0 + Σ_k c_k τ_k`` run unit by unit, the skeleton ``pretrained`` read from ``weights``.

    ``coefficients``: laid out over ``keys`` (the merged tensors), expert rows in the order of
    ``stage_vectors``' output (a start first, then ``experts``). ``vectors_dir``: the per-unit
    task-vector cache (kept across an interrupted run). ``stage_vectors(vectors, pretrained,
    include)``: a unit's task vectors transformed once, e.g. a data-free start put first.
    """

    def __init__(
        self,
        pretrained: nn.Module,
        weights: Mapping[str, Tensor],
        experts: Mapping[str, WeightsSource],
        coefficients: MergeCoefficients,
        keys: Sequence[str],
        vectors_dir: str | Path,
        *,
        dtype: str = "float32",
        device: torch.device | str = "cpu",
        stage_vectors: Callable[[TaskVectors, nn.Module, list[str]], TaskVectors] | None = None,
        progress: bool = True,
    ):
        super().__init__()
        if not isinstance(coefficients, MergeCoefficients):
            raise ValueError("streamed learning keeps every coefficient in memory: use granularity task, layer, chunk or group")
        self.device = torch.device(device)
        self.streamed = StreamedModel(pretrained, weights, scope=keys, device=self.device)
        self.backbone = pretrained.requires_grad_(False).eval()
        config = getattr(self.backbone, "config", None)
        if config is not None and getattr(config, "use_cache", False):
            config.use_cache = False
        self.coefficients = coefficients.to(self.device)
        self.vectors = nn.Module()  # no task vector is held (the learner's DDP list of buffers to skip is empty)
        self.expert_names = list(coefficients.layout.expert_names)
        self.keys = list(keys)
        self._blocks = {key: merge_blocks(self.layout.rows[key], self.layout.numels[key], self.layout.tensor_slots[key])
                        for key in self.keys}
        self.units = self._find_units()
        self._files = Path(vectors_dir)
        self._cache_vectors(experts, dtype, stage_vectors, progress)
        self._inside: set[int] = set()
        for unit in self.units:
            self._wrap(unit)
        self._mode: tuple = ("pretrained", None, {})

    @property
    def layout(self):
        return self.coefficients.layout

    # ------------------------------------------------------------------ set-up
    def _find_units(self) -> list[Unit]:
        """The blocks, then every module outside them that holds parameters of its own, in model order."""
        aliases = parameter_aliases(self.backbone)
        prefix = find_blocks(self.backbone)
        scope = set(self.keys)

        def unit(number: int, name: str, module: nn.Module, recurse: bool) -> Unit:
            own = module.state_dict(keep_vars=True) if recurse else {**module._parameters, **module._buffers}
            locals_ = [n for n, t in own.items() if t is not None and (recurse or n not in module._non_persistent_buffers_set)]
            canonical = {n: aliases.get(f"{name}.{n}" if name else n, f"{name}.{n}" if name else n) for n in locals_}
            return Unit(number, name, module, canonical, [key for key in dict.fromkeys(canonical.values()) if key in scope])

        units = [unit(i, f"{prefix}.{i}", block, True) for i, block in enumerate(self.backbone.get_submodule(prefix))]
        for name, module in self.backbone.named_modules():
            inside = name == prefix or name.startswith(prefix + ".")
            if not inside and any(p is not None for p in module._parameters.values()):
                units.append(unit(len(units), name, module, False))
        covered = {key for u in units for key in u.tensors.values()}
        missing = [key for key in self.keys if key not in covered]
        if missing:
            raise KeyError(f"merged tensor {missing[0]!r} belongs to no module the streamed model runs")
        return units

    def _cache_vectors(self, experts, dtype, stage_vectors, progress: bool) -> None:
        """Each unit's task vectors, computed from its tensors alone, in one file per unit."""
        bar = progress_bar(len(self.units), "task vectors, unit by unit", unit="unit", enabled=progress)
        owners: dict[tuple[str, ...], int] = {}
        for unit in self.units:
            unit.cache = owners.setdefault(tuple(unit.merged), unit.number)
            file = self._file(unit.cache)
            if unit.merged and not file.exists():
                include = [f"^{re.escape(key)}$" for key in unit.merged]
                self.streamed.materialise(unit.merged)
                try:
                    vectors = TaskVectors.from_models(self.backbone, experts, include=include, dtype=dtype, low_rank=False)
                    if stage_vectors is not None:
                        vectors = stage_vectors(vectors, self.backbone, include)
                    if list(vectors.expert_names) != self.expert_names:
                        raise ValueError(f"task vectors of {unit.name!r} are for {list(vectors.expert_names)}, "
                                         f"the coefficients for {self.expert_names}")
                    vectors.save(file)
                finally:
                    self.streamed.release(unit.merged)
            bar.update(1)
        bar.close()

    def _file(self, number: int) -> Path:
        return self._files / f"unit-{number:05d}.safetensors"

    def _wrap(self, unit: Unit) -> None:
        """Replace the unit's forward: outside, it merges its tensors and runs (checkpointed under
        gradients); inside that run, the original forward."""
        original, module_id = unit.module.forward, id(unit.module)

        def forward(*args, **kwargs):
            if module_id in self._inside:
                return original(*args, **kwargs)
            mode = self._mode
            if mode[0] == "merged" and torch.is_grad_enabled() and mode[1].requires_grad:
                return checkpoint(self._run, unit, mode, *args, use_reentrant=False, **kwargs)
            return self._run(unit, mode, *args, **kwargs)

        unit.module.forward = forward

    # ------------------------------------------------------------------ running
    def _run(self, unit: Unit, mode: tuple, *args, **kwargs):
        tensors = self.unit_tensors(unit, mode)
        self._inside.add(id(unit.module))
        try:
            return functional_call(unit.module, tensors, args, kwargs, tie_weights=False, strict=False)
        finally:
            self._inside.discard(id(unit.module))
            self._unmap()

    def _unmap(self) -> None:
        """Unmap the pretrained checkpoint's files: pages a unit read stop counting as this process's
        memory (else the resident set would grow by every unit read, up to the whole model)."""
        if hasattr(self.streamed.weights, "close"):
            self.streamed.weights.close()

    def unit_tensors(self, unit: Unit, mode: tuple) -> dict[str, Tensor]:
        """``local name -> tensor`` for one unit: merged at ``mode``'s coefficients, an expert's,
        or pretrained; a tensor the caller passed itself (a task's head, by its module path) as given."""
        kind, value, given = mode
        own = {local: key for local, key in unit.tensors.items() if unit.path(local) not in given}
        canonical = {key: self.streamed.read(key) for key in dict.fromkeys(own.values())}
        merged = [key for key in unit.merged if key in canonical]
        if merged and kind != "pretrained":
            with safe_open(str(self._file(unit.cache)), framework="pt", device=str(self.device)) as handle:
                taus = [handle.get_tensor(key) for key in merged]
            if kind == "merged":
                bases = [canonical[key] for key in merged]
                canonical.update(zip(merged, merge_into(value, bases, [self._blocks[k] for k in merged], taus)))
            else:
                for key, tau in zip(merged, taus):
                    base = canonical[key]
                    canonical[key] = (base.float() + tau[value].float()).to(base.dtype)
        tensors = {local: canonical[key] for local, key in own.items()}
        tensors.update({local: given[unit.path(local)] for local in unit.tensors if local not in own})
        return tensors

    def merged_parameters(self) -> dict[str, Tensor]:
        """The marker of the merge at the current coefficients (differentiable under gradients)."""
        return {MERGED: self.coefficients()}

    def expert_parameters(self, expert: int | str) -> dict[str, int]:
        index = self.expert_names.index(expert) if isinstance(expert, str) else int(expert)
        return {EXPERT: index}

    def pretrained_parameters(self) -> dict[str, Tensor]:
        return {}

    def forward_with(self, params: Mapping[str, object], *args, **kwargs):
        """Run the backbone unit by unit in the mode ``params`` names; its other entries (a task's
        head) are swapped in as given."""
        given = dict(params)
        if MERGED in given:
            mode = ("merged", given.pop(MERGED))
        elif EXPERT in given:
            mode = ("expert", given.pop(EXPERT))
        else:
            mode = ("pretrained", None)
        self._mode = (*mode, given)  # the units read the tensors given to them from here, in the backward too
        try:
            return self.backbone(*args, **kwargs)
        finally:
            self._mode = ("pretrained", None, {})

    def forward(self, *args, **kwargs):
        return self.forward_with(self.merged_parameters(), *args, **kwargs)

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def write_merged(self, folder: str | Path) -> Path:
        """The merged model at the current coefficients, one shard per unit (then the rest of the
        state: persistent buffers outside every unit), never whole in memory."""
        writer = ShardWriter(folder, len(self.units) + 1)
        mode, written = ("merged", self.coefficients(), {}), set()
        for unit in self.units:
            tensors = self.unit_tensors(unit, mode)
            own = {key: tensors[local].contiguous() for local, key in unit.tensors.items() if key not in written}
            writer.write(unit.number, own)
            written.update(own)
            del tensors, own
            self._unmap()
            return_freed_memory()
        rest = [key for key in self.streamed.keys if key not in written and self.streamed.stored[key] is not None]
        writer.write(len(self.units), {key: self.streamed.read(key) for key in rest})
        writer.finish()
        return Path(folder)

    def _apply(self, fn, recurse: bool = True):
        """Only the coefficients move (the skeleton's tensors are read onto ``device`` as needed)."""
        self.coefficients._apply(fn, recurse)
        return self
