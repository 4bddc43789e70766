"""The merged model: ``θ = θ_0 + Σ_k c_k ⊙ τ_k`` as a differentiable function of the coefficients.

The backbone is never modified: ``torch.func.functional_call`` runs it with the merged
tensors, so any ``nn.Module`` (Hugging Face or not) works unchanged, and autograd gives
``∂L/∂c_k = <∂L/∂θ, τ_k>`` for every coefficient.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from adamerge.core.granularities import ChunkSpec, GroupSpec
from adamerge.core.layouts import Granularity, build_layout, chunk_sizes
from adamerge.core.constraints import ConstraintSpec
from adamerge.core.coefficients import InitSpec, MergeCoefficients
from adamerge.core.element import ElementCoefficients
from adamerge.core.low_rank import LowRankStack, merge_low_rank
from adamerge.core.scope import parameter_aliases
from adamerge.core.spectral import SpectralMatrices
from adamerge.core.task_vectors import TaskVectors


BLOCK = 1 << 20
"""Entries per expert that one merge operation handles: bounds the full-precision copy of
bf16/fp16 (or offloaded) task vectors to ``K × BLOCK`` values at a time."""


class _Merge(torch.autograd.Function):
    """Every merged tensor in one autograd node: ``θ = base + Σ_k c[k, slot] τ[k]``, block by block.

    One node per step (not one per tensor) keeps Python and autograd overhead small. Each block
    (a contiguous range of a flattened tensor that reads one coefficient slot) is one fused
    ``addmv`` forward and one ``mv`` backward, so τ is read once per pass, in its storage dtype
    and on its own device, and only ``K × BLOCK`` of it is ever converted at once. The sums run
    in the coefficients' float32 (or the base's dtype, if wider): a bf16/fp16 model gets
    ``(base + Σ_k c_k τ_k)`` cast once to its dtype, never coefficients rounded to it.
    """

    @staticmethod
    def forward(ctx, values: Tensor, bases: list[Tensor], blocks: list[list[tuple[int, int, int]]], *taus: Tensor):
        ctx.save_for_backward(*taus)
        ctx.blocks, ctx.values_shape, ctx.values_dtype, ctx.values_device = blocks, values.shape, values.dtype, values.device
        columns: dict[tuple, Tensor] = {}  # [S, K]: the coefficients of each slot, per compute dtype and device
        merged = []
        for base, tau, tensor_blocks in zip(bases, taus, blocks):
            compute = torch.promote_types(values.dtype, base.dtype)
            where = (compute, base.device)
            if where not in columns:
                columns[where] = values.to(dtype=compute, device=base.device).t()
            flat_base, flat_tau = base.reshape(-1), tau.view(tau.shape[0], -1)
            out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
            flat_out = out.view(-1)
            for start, stop, slot in tensor_blocks:
                vectors = flat_tau[:, start:stop].to(device=base.device, dtype=compute, non_blocking=True)
                if compute == base.dtype:
                    torch.addmv(flat_base[start:stop], vectors.t(), columns[where][slot], out=flat_out[start:stop])
                else:  # the sum in `compute`, then one rounding to the base's dtype
                    flat_out[start:stop] = torch.addmv(flat_base[start:stop].to(compute), vectors.t(), columns[where][slot])
            merged.append(out)
        return tuple(merged)

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        taus = ctx.saved_tensors
        parts, slots = [], []
        for grad, tau, tensor_blocks in zip(grads, taus, ctx.blocks):
            if grad is None:  # this tensor did not reach the loss
                continue
            compute = torch.promote_types(ctx.values_dtype, grad.dtype)
            flat_grad, flat_tau = grad.reshape(-1), tau.view(tau.shape[0], -1)
            for start, stop, slot in tensor_blocks:
                vectors = flat_tau[:, start:stop].to(device=grad.device, dtype=compute, non_blocking=True)
                parts.append(vectors @ flat_grad[start:stop].to(compute))
                slots.append(slot)
        K, S = ctx.values_shape
        grad_values = torch.zeros(S, K, dtype=ctx.values_dtype, device=ctx.values_device)
        if parts:
            index = torch.tensor(slots, device=grad_values.device)
            parts = torch.stack([part.to(device=grad_values.device, dtype=grad_values.dtype) for part in parts])
            grad_values.index_add_(0, index, parts)
        return (grad_values.t(), None, None, *([None] * len(taus)))


def merge_into(values: Tensor, bases: list[Tensor], blocks: list[list[tuple[int, int, int]]], taus: list[Tensor]) -> tuple[Tensor, ...]:
    """``base + Σ_k values[k, slot] τ_k`` for each tensor, blocks as :func:`merge_blocks` cuts them,
    in one autograd node (gradients reach ``values`` only)."""
    return _Merge.apply(values, bases, blocks, *taus)


def row_slots(rows: int, slots: tuple[int, ...]) -> list[int]:
    """The coefficient slot of every row of a tensor (its row chunks, as ``chunk_sizes``)."""
    return [slot for slot, size in zip(slots, chunk_sizes(rows, len(slots))) for _ in range(size)]


def merge_blocks(rows: int, numel: int, slots: tuple[int, ...], block: int = BLOCK) -> list[tuple[int, int, int]]:
    """``(start, stop, slot)`` ranges of a flattened tensor: its row chunks (as ``chunk_sizes``), cut into blocks."""
    per_row = numel // rows if rows else 0
    ranges, row = [], 0
    for slot, size in zip(slots, chunk_sizes(rows, len(slots))):
        start, stop = row * per_row, (row + size) * per_row
        ranges.extend((s, min(s + block, stop), slot) for s in range(start, stop, block))
        row += size
    return ranges


@torch.no_grad()
def state_with_tensors(backbone: nn.Module, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``backbone``'s state dict with ``tensors`` (canonical names) in place, tied aliases included."""
    state = {name: tensor.detach() for name, tensor in backbone.state_dict().items()}
    state.update({key: tensor.detach() for key, tensor in tensors.items()})
    for alias, canonical in parameter_aliases(backbone).items():
        if canonical in tensors and alias in state:
            state[alias] = tensors[canonical].detach()
    return state


def module_with_tensors(backbone: nn.Module, tensors: Mapping[str, Tensor]) -> nn.Module:
    """A standalone copy of ``backbone`` holding ``tensors`` (eval mode, trainable)."""
    module = copy.deepcopy(backbone)
    module.load_state_dict(state_with_tensors(backbone, tensors))
    return module.requires_grad_(True).eval()


def _check_shared(layout, expert_names, shapes) -> None:
    """Shared coefficients must be for the same experts and cover every merged tensor."""
    if tuple(layout.expert_names) != tuple(expert_names):
        raise ValueError(f"shared coefficients are for experts {list(layout.expert_names)}, this merge has {list(expert_names)}")
    missing = [key for key in shapes if key not in layout.tensor_slots]
    if missing:
        raise KeyError(f"shared coefficients do not cover tensor {missing[0]!r} ({len(missing)} missing)")
    for key, shape in shapes.items():
        if layout.numels[key] != math.prod(shape):
            raise ValueError(f"shared coefficients were laid out for another shape of {key!r}")


class FunctionalModel(nn.Module):
    """A frozen backbone run with tensors swapped in: what tasks call, whatever the merge.

    The backbone is frozen in place and kept in eval mode (no dropout; BatchNorm uses the
    pretrained running stats, which are never updated).
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"the backbone must be an nn.Module, got {type(backbone).__name__}")
        self.backbone = backbone.requires_grad_(False).eval()
        # tied tensors (one tensor under several names) need functional_call's tie search; others skip it
        named = [*self.backbone.named_parameters(remove_duplicate=False), *self.backbone.named_buffers(remove_duplicate=False)]
        self._tied = len({id(tensor) for _, tensor in named}) < len(named)

    def base_tensors(self) -> dict[str, Tensor]:
        """Every parameter and buffer of the backbone at its current value (tied names once)."""
        base = dict(self.backbone.named_parameters())
        base.update(dict(self.backbone.named_buffers()))
        return base

    def forward_with(self, params: Mapping[str, Tensor], *args, **kwargs):
        """Run the backbone with the given tensors swapped in (merged weights, plus e.g. a task's head)."""
        return functional_call(self.backbone, dict(params), args, kwargs, tie_weights=self._tied, strict=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self


class _VectorStore(nn.Module):
    """The task vectors, as non-persistent buffers. Offloaded, they stay in host memory whatever
    ``.to()``/``.cuda()``/``.half()`` does to the model, and the merge copies each block to the
    model's device as it needs it: where a GPU is present they are kept contiguous in pinned
    (page-locked) memory, so those copies are asynchronous."""

    def __init__(self, offload: bool = False):
        super().__init__()
        self.offload = offload

    def keep(self, name: str, tensor: Tensor) -> None:
        """Hold ``tensor`` as buffer ``name``: contiguous, and pinned when offloaded next to a GPU."""
        tensor = tensor.contiguous()
        if self.offload and torch.cuda.is_available() and tensor.device.type == "cpu":
            tensor = tensor.pin_memory()
        self.register_buffer(name, tensor, persistent=False)

    def _apply(self, fn, recurse: bool = True):
        return self if self.offload else super()._apply(fn, recurse)


class MergedModel(FunctionalModel):
    """A frozen backbone whose in-scope weights are ``θ_0 + Σ_k c_k ⊙ τ_k``.

    Only the coefficients (``self.coefficients``) are trainable. Call it like the backbone:
    ``merged(*inputs)``; with several tasks (or batches) per step, merge once with
    ``params = merged.merged_parameters()`` and call ``merged.forward_with(params, ...)`` for
    each: every call of ``merged(...)`` with gradients on re-merges the whole model (a loop
    over K tasks would merge K times per step). One backward over the summed losses, or one
    per task with ``retain_graph=True``, both reach the coefficients through that one merge.
    The ``pretrained`` module is frozen in place and kept in eval mode (pass a copy to keep
    yours trainable). ``coefficients`` shares an existing coefficient module whose layout
    covers these tensors (and possibly more: progressive distillation merges one block at a
    time against the whole model's coefficients). ``granularity="spectral"`` (``rank=``) gives each
    singular component of every expert's matrix its own coefficient (:mod:`adamerge.core.spectral`).
    ``offload_vectors=True`` keeps the task vectors in host memory (as
    given: e.g. ``TaskVectors.load`` memory-maps its file) when the model moves to an
    accelerator; each step then streams them to it block by block (``K × BLOCK`` entries at a time).
    """

    def __init__(
        self,
        pretrained: nn.Module,
        task_vectors: TaskVectors,
        granularity: Granularity = "layer",
        init: InitSpec = 0.3,
        constraint: ConstraintSpec = None,
        *,
        groups: GroupSpec = None,
        chunks: ChunkSpec = None,
        rank: int | None = None,
        freeze: str | list[str] | None = None,
        offload_vectors: bool = False,
        coefficients: MergeCoefficients | ElementCoefficients | None = None,
    ):
        super().__init__(pretrained)
        self.expert_names = task_vectors.expert_names
        self.keys = list(task_vectors.keys)
        self._check_scope(task_vectors)
        shapes = {key: tuple(task_vectors.shape(key)[1:]) for key in self.keys}
        dense_only = (granularity if coefficients is None else coefficients.layout.granularity) in ("element", "spectral")
        self.vectors = _VectorStore(offload_vectors)
        self._low_rank: set[int] = set()  # indices of the keys merged from LoRA factors
        for index, key in enumerate(self.keys):  # contiguous: the merge reads flat views of them
            factors = None if dense_only else task_vectors.low_rank(key)  # element-wise and spectral need τ dense
            if factors is None:
                self.vectors.keep(f"t{index}", task_vectors[key])
                continue
            self._low_rank.add(index)
            for part in ("left", "right", "owner"):
                self.vectors.keep(f"t{index}_{part}", getattr(factors, part))
        if coefficients is None:
            layout = build_layout(self.expert_names, shapes, granularity, groups=groups, chunks=chunks, rank=rank, freeze=freeze)
            if layout.granularity == "element":
                coefficients = ElementCoefficients(layout, shapes, init=init, constraint=constraint)
            else:
                coefficients = MergeCoefficients(layout, init=init, constraint=constraint)
        else:
            _check_shared(coefficients.layout, self.expert_names, shapes)
        self.coefficients = coefficients
        layout = coefficients.layout
        self._spectral = SpectralMatrices(layout, self.keys, self.vectors, {k: t.device for k, t in self.base_tensors().items()})
        self._blocks = [merge_blocks(layout.rows[key], layout.numels[key], self._spectral.dense_slots(i, layout.tensor_slots[key]))
                        for i, key in enumerate(self.keys)]
        self._row_slots = {
            index: torch.tensor(row_slots(layout.rows[self.keys[index]], layout.tensor_slots[self.keys[index]]))
            for index in self._low_rank
        }
        self._cache: tuple[tuple, dict[str, Tensor]] | None = None

    def _check_scope(self, task_vectors: TaskVectors) -> None:
        aliases = parameter_aliases(self.backbone)
        own = self.base_tensors()
        for key in self.keys:
            if key in aliases:
                raise KeyError(f"{key!r} is tied to {aliases[key]!r} in the backbone: merge the tensor as {aliases[key]!r}")
            if key not in own:
                raise KeyError(f"task vector {key!r} is not a parameter or buffer of the backbone")
            if tuple(own[key].shape) != tuple(task_vectors.shape(key)[1:]):
                raise ValueError(
                    f"shape mismatch for {key!r}: backbone {tuple(own[key].shape)}, "
                    f"task vector {tuple(task_vectors.shape(key)[1:])}"
                )

    def load_coefficients(self, source: MergeCoefficients | str) -> None:
        """Restore saved coefficients exactly (same layout required), e.g. a finished run's."""
        if isinstance(self.coefficients, ElementCoefficients):
            saved = source if isinstance(source, ElementCoefficients) else ElementCoefficients.load(source)
            self.coefficients.load_state_from(saved)
            return
        saved = source if isinstance(source, MergeCoefficients) else MergeCoefficients.load(source)
        if saved.layout != self.layout:
            raise ValueError(
                f"saved coefficients have a different layout ({saved.layout.granularity}, "
                f"{saved.layout.num_experts}x{saved.layout.num_slots}) than this merge "
                f"({self.layout.granularity}, {self.layout.num_experts}x{self.layout.num_slots})"
            )
        if saved.constraint.describe() != self.coefficients.constraint.describe():
            raise ValueError(
                f"saved coefficients use constraint {saved.constraint.describe()}, "
                f"this merge uses {self.coefficients.constraint.describe()}"
            )
        with torch.no_grad():
            for name in ("raw", "residual", "fixed", "initial"):
                getattr(self.coefficients, name).copy_(getattr(saved, name))

    @property
    def layout(self):
        return self.coefficients.layout

    def task_vector(self, key: str) -> Tensor:
        """The stacked ``[K, *shape]`` task vectors of one merged tensor (a low-rank one materialised)."""
        index = self.keys.index(key)
        return self._stack(index).dense() if index in self._low_rank else getattr(self.vectors, f"t{index}")

    def _factors(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(getattr(self.vectors, f"t{index}_{part}") for part in ("left", "right", "owner"))

    def _stack(self, index: int) -> LowRankStack:
        return LowRankStack(*self._factors(index), len(self.expert_names))

    # ------------------------------------------------------------------ merging
    def merged_parameters(self) -> dict[str, Tensor]:
        """``key -> merged tensor`` for every tensor in the merge scope.

        Recomputed when a graph is needed; otherwise (``no_grad`` / inference) cached until
        the coefficients change (tensors made in inference mode are kept apart, since they
        cannot enter a graph later).
        """
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.coefficients.parameters()):
            self._cache = None
            return self._merge()
        version = (self.coefficients.version(), torch.is_inference_mode_enabled())
        if self._cache is None or self._cache[0] != version:
            self._cache = (version, self._merge())
        return self._cache[1]

    def _merge(self) -> dict[str, Tensor]:
        base = self.base_tensors()
        if isinstance(self.coefficients, ElementCoefficients):
            return {key: self._merge_elementwise(key, base[key], i) for i, key in enumerate(self.keys)}
        values = self.coefficients()
        columns = self._spectral.columns(values, self.coefficients.initial)  # spectral anchors appended
        dense = [index for index in range(len(self.keys)) if index not in self._low_rank]
        taus = [getattr(self.vectors, f"t{index}") for index in dense]
        bases = [self._spectral.base(index, base[self.keys[index]], values.dtype) for index in dense]
        merged = {}
        if dense:
            merged.update(zip([self.keys[i] for i in dense], merge_into(columns, bases, [self._blocks[i] for i in dense], taus)))
        merged.update(self._spectral.add_components(merged, self.keys, columns, self.vectors, base))
        for index in self._low_rank:  # LoRA experts' factors: one product per tensor, τ never formed
            key, slots = self.keys[index], self._row_slots[index].to(values.device)
            merged[key] = merge_low_rank(base[key], *self._factors(index), values[:, slots].t())
        return {key: merged[key] for key in self.keys}

    def _merge_elementwise(self, key: str, base: Tensor, index: int) -> Tensor:
        """``θ_0 + Σ_k C_k ⊙ τ_k`` for one tensor (autograd gives ``∂L/∂C_k = ∂L/∂θ ⊙ τ_k``),
        summed in the coefficients' float32 (or wider) and cast to the base's dtype."""
        tau = getattr(self.vectors, f"t{index}").to(device=base.device)
        return (base + (self.coefficients.effective(key) * tau).sum(dim=0)).to(base.dtype)

    @torch.no_grad()
    def pretrained_parameters(self) -> dict[str, Tensor]:
        """The merge scope at ``θ_0`` (every coefficient zero)."""
        base = self.base_tensors()
        return {key: base[key] for key in self.keys}

    @torch.no_grad()
    def expert_parameters(self, expert: int | str) -> dict[str, Tensor]:
        """``θ_0 + τ_k`` over the merge scope: expert ``k``'s own weights, rebuilt from its task vector."""
        index = self.expert_names.index(expert) if isinstance(expert, str) else int(expert)
        base = self.base_tensors()
        out = {}
        for i, key in enumerate(self.keys):
            tau = self._stack(i).expert(index) if i in self._low_rank else getattr(self.vectors, f"t{i}")[index]
            out[key] = base[key] + tau.to(device=base[key].device, dtype=base[key].dtype)
        return out

    def forward(self, *args, **kwargs):
        return self.forward_with(self.merged_parameters(), *args, **kwargs)

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, Tensor]:
        """The backbone's full state dict with the merged tensors in place (tied names included)."""
        return state_with_tensors(self.backbone, self._merge())

    def to_module(self) -> nn.Module:
        """A standalone copy of the backbone holding the merged weights (eval mode, trainable)."""
        return module_with_tensors(self.backbone, self._merge())

    # ------------------------------------------------------------------ nn.Module plumbing
    def _apply(self, fn, recurse: bool = True):
        self._cache = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        layout = self.layout
        return (
            f"experts={list(self.expert_names)}, tensors={len(self.keys)}, granularity={layout.granularity!r}, "
            f"coefficients={layout.num_experts}x{layout.num_slots} ({len(layout.frozen)} frozen slots"
            f"{', one value per entry' if layout.granularity == 'element' else ''}), "
            f"constraint={self.coefficients.constraint.name!r}"
        )
