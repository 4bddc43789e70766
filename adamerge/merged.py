"""The merged model: ``θ = θ_0 + Σ_k c_k ⊙ τ_k`` as a differentiable function of the coefficients.

The backbone is never modified: ``torch.func.functional_call`` runs it with the merged
tensors, so any ``nn.Module`` (Hugging Face or not) works unchanged, and autograd gives
``∂L/∂c_k = <∂L/∂θ, τ_k>`` for every coefficient.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from adamerge.coefficients import (
    ChunkSpec,
    ConstraintSpec,
    Granularity,
    GroupSpec,
    InitSpec,
    MergeCoefficients,
    build_layout,
    chunk_sizes,
)
from adamerge.task_vectors import TaskVectors, parameter_aliases


class _WeightedSum(torch.autograd.Function):
    """``base + Σ_k c[k] τ[k]`` (or per-row ``c[k, r]``), computed in ``base``'s dtype.

    τ is saved for backward in its own storage dtype, so bf16 task vectors stay bf16 in
    memory while the coefficients and the sum keep full precision.
    """

    @staticmethod
    def forward(ctx, base: Tensor, coefficients: Tensor, tau: Tensor) -> Tensor:
        ctx.save_for_backward(coefficients, tau)
        vectors = tau.to(base.dtype)
        coefficients = coefficients.to(base.dtype)
        if coefficients.dim() == 1:
            delta = coefficients @ vectors.reshape(vectors.shape[0], -1)
        else:
            delta = torch.einsum("kr,krc->rc", coefficients, vectors.reshape(*coefficients.shape, -1))
        return base + delta.view(base.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        coefficients, tau = ctx.saved_tensors
        vectors = tau.to(grad.dtype)
        if coefficients.dim() == 1:
            grad_c = vectors.reshape(vectors.shape[0], -1) @ grad.reshape(-1)
        else:
            rows = coefficients.shape[1]
            grad_c = torch.einsum("krc,rc->kr", vectors.reshape(*coefficients.shape, -1), grad.reshape(rows, -1))
        return None, grad_c.to(coefficients.dtype), None


def weighted_sum(base: Tensor, coefficients: Tensor, tau: Tensor) -> Tensor:
    """``base + Σ_k coefficients[k] · tau[k]``; ``coefficients`` is ``[K]`` or per-row ``[K, rows]``."""
    return _WeightedSum.apply(base, coefficients, tau)


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

    def base_tensors(self) -> dict[str, Tensor]:
        """Every parameter and buffer of the backbone at its current value (tied names once)."""
        base = dict(self.backbone.named_parameters())
        base.update(dict(self.backbone.named_buffers()))
        return base

    def forward_with(self, params: Mapping[str, Tensor], *args, **kwargs):
        """Run the backbone with the given tensors swapped in (merged weights, plus e.g. a task's head)."""
        return functional_call(self.backbone, dict(params), args, kwargs, tie_weights=True, strict=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self


class MergedModel(FunctionalModel):
    """A frozen backbone whose in-scope weights are ``θ_0 + Σ_k c_k ⊙ τ_k``.

    Only the coefficients (``self.coefficients``) are trainable. Call it like the backbone:
    ``merged(*inputs)``.
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
        freeze: str | list[str] | None = None,
    ):
        super().__init__(pretrained)
        self.expert_names = task_vectors.expert_names
        self.keys = list(task_vectors.keys)
        self._check_scope(task_vectors)
        self.vectors = nn.Module()
        for index, key in enumerate(self.keys):
            self.vectors.register_buffer(f"t{index}", task_vectors[key], persistent=False)
        shapes = {key: tuple(task_vectors[key].shape[1:]) for key in self.keys}
        layout = build_layout(self.expert_names, shapes, granularity, groups=groups, chunks=chunks, freeze=freeze)
        self.coefficients = MergeCoefficients(layout, init=init, constraint=constraint)
        self._slots = [layout.tensor_slots[key] for key in self.keys]
        self._aliases = parameter_aliases(self.backbone)
        self.row_chunks = nn.Module()
        for index, key in enumerate(self.keys):
            slots = self._slots[index]
            if len(slots) > 1:
                sizes = torch.tensor(chunk_sizes(layout.rows[key], len(slots)))
                self.row_chunks.register_buffer(
                    f"t{index}", torch.arange(len(slots)).repeat_interleave(sizes), persistent=False
                )
        self._cache: tuple[tuple, dict[str, Tensor]] | None = None

    def _check_scope(self, task_vectors: TaskVectors) -> None:
        aliases = parameter_aliases(self.backbone)
        own = self.base_tensors()
        for key in self.keys:
            if key in aliases:
                raise KeyError(f"{key!r} is tied to {aliases[key]!r} in the backbone: merge the tensor as {aliases[key]!r}")
            if key not in own:
                raise KeyError(f"task vector {key!r} is not a parameter or buffer of the backbone")
            if tuple(own[key].shape) != tuple(task_vectors[key].shape[1:]):
                raise ValueError(
                    f"shape mismatch for {key!r}: backbone {tuple(own[key].shape)}, "
                    f"task vector {tuple(task_vectors[key].shape[1:])}"
                )

    def load_coefficients(self, source: MergeCoefficients | str) -> None:
        """Restore saved coefficients exactly (same layout required), e.g. a finished run's."""
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
        """The stacked ``[K, *shape]`` task vectors of one merged tensor."""
        return getattr(self.vectors, f"t{self.keys.index(key)}")

    # ------------------------------------------------------------------ merging
    def merged_parameters(self) -> dict[str, Tensor]:
        """``key -> merged tensor`` for every tensor in the merge scope.

        Recomputed when a graph is needed; otherwise (``no_grad`` / inference) cached until
        the coefficients change (tensors made in inference mode are kept apart, since they
        cannot enter a graph later).
        """
        if torch.is_grad_enabled() and self.coefficients.raw.requires_grad:
            self._cache = None
            return self._merge()
        version = (self.coefficients.version(), torch.is_inference_mode_enabled())
        if self._cache is None or self._cache[0] != version:
            self._cache = (version, self._merge())
        return self._cache[1]

    def _merge(self) -> dict[str, Tensor]:
        values = self.coefficients()
        base = self.base_tensors()
        merged = {}
        for index, key in enumerate(self.keys):
            slots = self._slots[index]
            if len(slots) == 1:
                coefficients = values[:, slots[0]]
            else:
                coefficients = values[:, list(slots)][:, getattr(self.row_chunks, f"t{index}")]
            merged[key] = weighted_sum(base[key], coefficients, getattr(self.vectors, f"t{index}"))
        return merged

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
        return {
            key: base[key] + getattr(self.vectors, f"t{i}")[index].to(base[key].dtype)
            for i, key in enumerate(self.keys)
        }

    def forward(self, *args, **kwargs):
        return self.forward_with(self.merged_parameters(), *args, **kwargs)

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, Tensor]:
        """The backbone's full state dict with the merged tensors in place (tied names included)."""
        merged = self._merge()
        state = {name: tensor.detach() for name, tensor in self.backbone.state_dict().items()}
        for key, tensor in merged.items():
            state[key] = tensor.detach()
        for alias, canonical in self._aliases.items():
            if canonical in merged and alias in state:
                state[alias] = merged[canonical].detach()
        return state

    def to_module(self) -> nn.Module:
        """A standalone copy of the backbone holding the merged weights (eval mode, trainable)."""
        module = copy.deepcopy(self.backbone)
        module.load_state_dict(self.merged_state_dict())
        return module.requires_grad_(True).eval()

    # ------------------------------------------------------------------ nn.Module plumbing
    def _apply(self, fn, recurse: bool = True):
        self._cache = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        layout = self.layout
        return (
            f"experts={list(self.expert_names)}, tensors={len(self.keys)}, granularity={layout.granularity!r}, "
            f"coefficients={layout.num_experts}x{layout.num_slots} ({len(layout.frozen)} frozen slots), "
            f"constraint={self.coefficients.constraint.name!r}"
        )
