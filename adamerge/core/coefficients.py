"""``MergeCoefficients``: the ``[K, S]`` coefficient matrix of a layout as an ``nn.Parameter``,
its initial values (a number, per expert, or transferred from an earlier run) and its files."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

import torch
from safetensors import safe_open
from torch import Tensor, nn

from adamerge.core.constraints import ConstraintSpec, make_constraint
from adamerge.core.layouts import CoefficientLayout, chunk_sizes
from adamerge.io.checkpoints import UnreadableInput, reading, save_safetensors, write_text


InitSpec = Union[float, Sequence[float], Mapping[str, float], Tensor, "MergeCoefficients", str, Path]


class Float32Module(nn.Module):
    """A module whose tensors follow it across devices but keep their dtype: coefficients stay
    float32 (and so do their gradients and optimiser state) when the model is cast, e.g. by
    Lightning's ``bf16-true``, which calls ``module.to(torch.bfloat16)``. A dtype-changing
    conversion moves the original tensor to the conversion's device instead of rounding it."""

    def _apply(self, fn, recurse: bool = True):
        def same_dtype(tensor: Tensor) -> Tensor:
            converted = fn(tensor)
            if converted.dtype == tensor.dtype:
                return converted
            return tensor.to(device=converted.device)

        return super()._apply(same_dtype, recurse)


class MergeCoefficients(Float32Module):
    """The ``[K, S]`` coefficient matrix of a layout: trainable slots as one ``nn.Parameter``.

    ``forward()`` returns the effective values (after the constraint) in slot order. Its tensors
    keep their dtype whatever the model is cast to (:class:`Float32Module`).
    """

    def __init__(self, layout: CoefficientLayout, init: InitSpec = 0.3, constraint: ConstraintSpec = None):
        super().__init__()
        self.layout = layout
        self.constraint = make_constraint(constraint)
        values = resolve_init(init, layout)
        trainable, frozen = layout.trainable_slots, layout.frozen_slots
        self.raw = nn.Parameter(self.constraint.to_raw(values[:, trainable]))
        # No float32 logit hits some values exactly (e.g. sigmoid at 1e-3: one ulp of the logit
        # moves the output by several ulps), so a constant, ulp-sized residual makes the initial
        # effective values exact. It is zero wherever ``to_raw`` is already exact.
        with torch.no_grad():
            residual = values[:, trainable] - self.constraint.to_effective(self.raw)
        self.register_buffer("residual", residual)
        self.register_buffer("fixed", values[:, frozen].clone())
        order = torch.empty(layout.num_slots, dtype=torch.long)
        order[torch.tensor(trainable + frozen, dtype=torch.long)] = torch.arange(layout.num_slots)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("initial", values.clone())

    def forward(self) -> Tensor:
        effective = torch.cat([self.constraint.to_effective(self.raw) + self.residual, self.fixed], dim=1)
        return effective[:, self.order]

    def project_(self) -> None:
        """Re-impose the constraint's bounds on the raw values (call after an optimiser step)."""
        self.constraint.project_(self.raw)

    def version(self) -> tuple:
        """Changes whenever the coefficient values may have changed (for caching merged weights)."""
        return (
            self.raw._version,
            self.raw.data_ptr(),
            self.fixed._version,
            self.fixed.data_ptr(),
            self.residual._version,
            self.residual.data_ptr(),
        )

    def summary(self) -> Tensor:
        """``[K, S]`` effective values, one per expert and slot (what plots show)."""
        return self().detach()

    def row_values(self, key: str, values: Tensor | None = None) -> Tensor:
        """``[K, rows]``: the coefficient applied to every row of tensor ``key`` (its row chunks'; a
        matrix's ``spectral`` slots scale singular components, which span every row, and have none)."""
        values = self() if values is None else values
        slots = self.layout.tensor_slots[key]
        rows = self.layout.rows[key]
        if len(slots) == 1:
            return values[:, slots[0]].unsqueeze(1).expand(-1, rows)
        if self.layout.granularity == "spectral":
            raise ValueError(f"spectral coefficients scale singular components, not rows: {key!r} has no coefficient per row")
        sizes = torch.tensor(chunk_sizes(rows, len(slots)), device=values.device)
        return values[:, list(slots)].repeat_interleave(sizes, dim=1)

    def as_dict(self) -> dict[str, dict[str, float | list[float]]]:
        """Readable ``expert -> tensor -> value`` (a list of values for a chunked tensor)."""
        with torch.no_grad():
            values = self().cpu()
        out: dict[str, dict[str, float | list[float]]] = {}
        for k, expert in enumerate(self.layout.expert_names):
            out[expert] = {}
            for key, slots in self.layout.tensor_slots.items():
                chunk_values = [round(float(values[k, s]), 6) for s in slots]
                out[expert][key] = chunk_values[0] if len(slots) == 1 else chunk_values
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, extra_metadata: Mapping[str, str] | None = None) -> None:
        """Save effective values, raw values and the layout (safetensors) plus a readable JSON beside it."""
        path = Path(path)
        metadata = {
            "format": "adamerge.coefficients",
            "layout": self.layout.to_json(),
            "constraint": json.dumps(self.constraint.describe()),
            **dict(extra_metadata or {}),
        }
        with torch.no_grad():
            tensors = {"values": self().float(), "raw": self.raw.detach().float(), "initial": self.initial.float()}
        save_safetensors(tensors, path, metadata=metadata)
        readable = {
            "granularity": self.layout.granularity,
            "constraint": self.constraint.describe(),
            "coefficients": self.as_dict(),
        }
        write_text(path.with_suffix(".json"), json.dumps(readable, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "MergeCoefficients":
        """Rebuild saved coefficients exactly (layout, constraint, values)."""
        if not Path(path).exists():
            raise FileNotFoundError(f"coefficients: no file {path}")
        with reading("coefficients", path), safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != "adamerge.coefficients":
                raise UnreadableInput(f"{path} is not an adamerge coefficient file")
            raw = handle.get_tensor("raw")
            initial = handle.get_tensor("initial")
        layout = CoefficientLayout.from_json(metadata["layout"])
        coefficients = cls(layout, init=initial, constraint=make_constraint(json.loads(metadata["constraint"])))
        with torch.no_grad():
            coefficients.raw.copy_(raw)
        return coefficients


def resolve_init(init: InitSpec, layout: CoefficientLayout) -> Tensor:
    """Initial effective values ``[K, S]`` from a scalar, per-expert values or earlier coefficients."""
    K, S = layout.num_experts, layout.num_slots
    if isinstance(init, (str, Path)):
        init = MergeCoefficients.load(init)
    if isinstance(init, MergeCoefficients):
        return _transfer(init, layout)
    if isinstance(init, Tensor):
        if init.shape != (K, S):
            raise ValueError(f"init tensor has shape {tuple(init.shape)}, expected (experts, slots) = ({K}, {S})")
        return init.detach().float().clone()
    if isinstance(init, (int, float)):
        return torch.full((K, S), float(init))
    if isinstance(init, Mapping):
        unknown = sorted(set(init) - set(layout.expert_names))
        missing = [e for e in layout.expert_names if e not in init]
        if unknown or missing:
            raise ValueError(f"init by expert name: unknown {unknown}, missing {missing}")
        init = [init[e] for e in layout.expert_names]
    per_expert = [float(v) for v in init]
    if len(per_expert) != K:
        raise ValueError(f"init has {len(per_expert)} values but there are {K} experts {list(layout.expert_names)}")
    return torch.tensor(per_expert).unsqueeze(1).expand(K, S).clone()


def _transfer(previous: MergeCoefficients, layout: CoefficientLayout) -> Tensor:
    """Start a new layout from earlier coefficients: each new slot gets the element-weighted
    mean of the earlier values over the entries it covers (task-wise → layer-wise, layer → chunk...;
    a singular component of a ``spectral`` matrix covers all of it). The same layout keeps the values."""
    if tuple(previous.layout.expert_names) != tuple(layout.expert_names):
        raise ValueError(
            f"init coefficients are for experts {list(previous.layout.expert_names)}, "
            f"this merge has {list(layout.expert_names)}"
        )
    missing = [k for k in layout.keys if k not in previous.layout.tensor_slots]
    if missing:
        raise ValueError(f"init coefficients do not cover tensor {missing[0]!r} ({len(missing)} missing)")
    with torch.no_grad():
        values = previous()
        if previous.layout == layout:
            return values.clone()
        total = torch.zeros(layout.num_experts, layout.num_slots, dtype=torch.float64)
        weight = torch.zeros(layout.num_slots, dtype=torch.float64)
        for key, slots in layout.tensor_slots.items():
            rows = previous.row_values(key, values).double()
            per_row = layout.numels[key] / layout.rows[key]
            if layout.granularity == "spectral" and len(slots) > 1:  # each component spans every row
                total[:, list(slots)] += rows.sum(dim=1, keepdim=True) * per_row
                weight[list(slots)] += layout.numels[key]
                continue
            start = 0
            for slot, size in zip(slots, chunk_sizes(layout.rows[key], len(slots))):
                total[:, slot] += rows[:, start : start + size].sum(dim=1) * per_row
                weight[slot] += size * per_row
                start += size
    return (total / weight.clamp(min=1e-30)).float()
