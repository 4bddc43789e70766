"""Element-wise merge coefficients: one coefficient per entry of every task vector.

``θ = θ_0 + Σ_k C_k ⊙ τ_k`` with ``C_k`` a tensor of the parameter's shape, as ProDistill
learns them (Xu et al., "Scalable Model Merging with Progressive Layer-wise Distillation",
ICML 2025: element-wise coefficients initialised at 0.3). Memory: ``K × |θ|`` coefficients,
plus twice that for Adam's moments — as much as the task vectors themselves, three times
over — which is why progressive distillation trains them one block at a time.

The layout is an ordinary :class:`~adamerge.core.layouts.CoefficientLayout` of granularity
``element`` (one slot per tensor); this module owns the per-entry values of each slot.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from adamerge.io.checkpoints import UnreadableInput, reading, save_safetensors, write_text
from adamerge.core.layouts import CoefficientLayout
from adamerge.core.constraints import ConstraintSpec, make_constraint
from adamerge.core.coefficients import Float32Module, InitSpec, resolve_init

FORMAT = "adamerge.element_coefficients"


class ElementCoefficients(Float32Module):
    """``key -> [K, *shape]`` coefficients of an ``element`` layout; trainable tensors are
    ``nn.Parameter``s (one per merged tensor, so an optimiser can take just a block's).

    ``forward()`` returns the effective values (after the constraint) of every tensor.
    Frozen tensors keep their initial per-tensor value (stored once per expert). Its tensors
    keep their dtype whatever the model is cast to.
    """

    def __init__(
        self,
        layout: CoefficientLayout,
        shapes: Mapping[str, Sequence[int]],
        init: InitSpec = 0.3,
        constraint: ConstraintSpec = None,
    ):
        super().__init__()
        if layout.granularity != "element":
            raise ValueError(f"ElementCoefficients needs an 'element' layout, not {layout.granularity!r}")
        self.layout = layout
        self.shapes = {key: tuple(int(d) for d in shapes[key]) for key in layout.keys}
        self.constraint = make_constraint(constraint)
        values = resolve_init(init, layout)  # [K, S]: each tensor's starting value per expert
        self.register_buffer("initial", values.clone())
        self.raw = nn.ParameterDict()
        self._names = {key: f"t{i}" for i, key in enumerate(layout.keys)}  # ParameterDict keys cannot hold dots
        for key in layout.keys:
            slot = layout.tensor_slots[key][0]
            if slot in layout.frozen:
                continue
            start = self.constraint.to_raw(values[:, slot])  # [K], exact as MergeCoefficients' raw
            self.raw[self._names[key]] = nn.Parameter(self._spread(start, key).clone())

    def _spread(self, per_expert: Tensor, key: str) -> Tensor:
        shape = self.shapes[key]
        return per_expert.view(-1, *([1] * len(shape))).expand(per_expert.shape[0], *shape)

    def is_trainable(self, key: str) -> bool:
        return self._names[key] in self.raw

    def parameters_of(self, keys: Sequence[str]) -> list[nn.Parameter]:
        """The trainable coefficient tensors of the given merged tensors (e.g. one block's)."""
        return [self.raw[self._names[k]] for k in keys if self.is_trainable(k)]

    def effective(self, key: str) -> Tensor:
        """``[K, *shape]``: the coefficients of one merged tensor."""
        if self.is_trainable(key):
            return self.constraint.to_effective(self.raw[self._names[key]])
        return self._spread(self.initial[:, self.layout.tensor_slots[key][0]], key)

    def forward(self) -> dict[str, Tensor]:
        return {key: self.effective(key) for key in self.layout.keys}

    def project_(self) -> None:
        for raw in self.raw.values():
            self.constraint.project_(raw)

    def version(self) -> tuple:
        return tuple((p._version, p.data_ptr()) for p in self.raw.values())

    def summary(self) -> Tensor:
        """``[K, S]``: each tensor's mean coefficient per expert (what plots and JSON show)."""
        with torch.no_grad():
            return torch.stack([self.effective(k).flatten(1).mean(dim=1) for k in self.layout.keys], dim=1)

    def as_dict(self) -> dict[str, dict[str, float]]:
        """Readable ``expert -> tensor -> mean coefficient``."""
        summary = self.summary().cpu()
        return {
            expert: {key: round(float(summary[k, s]), 6) for s, key in enumerate(self.layout.keys)}
            for k, expert in enumerate(self.layout.expert_names)
        }

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, extra_metadata: Mapping[str, str] | None = None) -> None:
        """Every tensor's coefficients (safetensors, named by the merged tensor) and a readable JSON
        of their means beside it."""
        path = Path(path)
        metadata = {
            "format": FORMAT,
            "layout": self.layout.to_json(),
            "shapes": json.dumps(self.shapes),
            "constraint": json.dumps(self.constraint.describe()),
            **dict(extra_metadata or {}),
        }
        with torch.no_grad():
            tensors = {f"raw.{key}": self.raw[self._names[key]].detach().float() for key in self.layout.keys if self.is_trainable(key)}
            tensors["initial"] = self.initial.float()
        save_safetensors(tensors, path, metadata=metadata)
        readable = {"granularity": "element", "constraint": self.constraint.describe(), "mean_coefficients": self.as_dict()}
        write_text(path.with_suffix(".json"), json.dumps(readable, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "ElementCoefficients":
        if not Path(path).exists():
            raise FileNotFoundError(f"coefficients: no file {path}")
        with reading("coefficients", path), safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise UnreadableInput(f"{path} is not an adamerge element-wise coefficient file")
            layout = CoefficientLayout.from_json(metadata["layout"])
            coefficients = cls(
                layout,
                json.loads(metadata["shapes"]),
                init=handle.get_tensor("initial"),
                constraint=make_constraint(json.loads(metadata["constraint"])),
            )
            with torch.no_grad():
                for key in layout.keys:
                    if coefficients.is_trainable(key):
                        coefficients.raw[coefficients._names[key]].copy_(handle.get_tensor(f"raw.{key}"))
        return coefficients

    def load_state_from(self, other: "ElementCoefficients") -> None:
        """Copy another instance's values (same layout and constraint)."""
        if other.layout != self.layout or other.constraint.describe() != self.constraint.describe():
            raise ValueError("saved element-wise coefficients have a different layout or constraint than this merge")
        with torch.no_grad():
            self.initial.copy_(other.initial)
            for name, raw in self.raw.items():
                raw.copy_(other.raw[name])

