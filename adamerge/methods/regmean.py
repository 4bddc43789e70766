"""RegMean and RegMean++: each linear layer solved as a regression onto the experts' outputs.

RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language
Models", arXiv 2212.09849). For every ``nn.Linear`` of the backbone whose weight is in the merge
scope, ``W`` minimises ``Σ_k ‖X_k Wᵀ − X_k W_kᵀ‖²`` (``X_k`` the layer's inputs while expert ``k``
runs on unlabelled inputs of its own task; PyTorch's ``W`` is ``[out, in]``):

    Wᵀ = (Σ_k G̃_k)⁻¹ Σ_k G̃_k W_kᵀ,    G_k = X_kᵀ X_k / N_k,    G̃_k = α G_k + (1 − α) diag(G_k)

``G̃_k`` keeps the diagonal and scales the off-diagonal entries by ``α`` (the paper's
``reduce_non_diagonal_ratio``; ``α = 1`` is the plain regression, ``α = 0`` the Gram-diagonal
weighted average ``Σ_k diag(G_k) W_k / Σ_k diag(G_k)`` per input column). ``G_k`` is the mean over
the ``N_k`` input rows (every token of every sample, padding included), as in the authors' code,
so each task weighs the same whatever its number of tokens. Every other tensor of the scope
(biases, norms, embeddings, non-``Linear`` weights such as GPT-2's ``Conv1D``) gets the experts'
mean, as in the paper. The solve is in task-vector form, ``Δᵀ = (Σ G̃_k)⁺ Σ G̃_k τ_kᵀ``, which is
the formula above for an invertible sum; solved with the pseudo-inverse (float64) around the
mean ``τ̄``, an input direction no expert's inputs reach gets the mean there (one expert is
returned exactly), and a linear layer that no task's inputs reach gets the mean.

RegMean++ (Nguyen et al., 2025, arXiv 2508.03121) merges layer by layer in forward order: the
inputs of layer ``ℓ`` come from the merged model's own earlier layers (``X_k^ℓ = f_M^{ℓ−1}(X_k^{ℓ−1})``
on task ``k``'s inputs), while inside layer ``ℓ`` expert ``k``'s weights run. A *layer* is a
transformer block (an item of the backbone's largest ``nn.ModuleList`` of one class), or a linear
module outside every block; tensors outside both (embeddings, a final norm) are averaged first,
as the authors' code merges the embeddings first. Each layer costs one pass over every task's
batches (from the inputs: the merged earlier layers are recomputed, not cached).

Paper defaults: ``α = 0.95`` (the RegMean++ configuration; RegMean's authors tune it per setting);
256 calibration inputs per task in the RegMean++ configuration (here ``batches`` of the recipe's
``trainer.batch_size``, default 4). Memory: one expert's tensors, the merged update and, per
linear layer, ``Σ_k G̃_k`` and ``Σ_k G̃_k τ_kᵀ``; never ``K`` experts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from adamerge.core.scope import Experts, Patterns
from adamerge.io.checkpoints import WeightsSource
from adamerge.methods.base import METHODS, MergeResult, apply_deltas
from adamerge.methods.calibration import Calibration, data_driven, input_grams
from adamerge.methods.experts import ExpertReader


def linear_layers(backbone: nn.Module, keys) -> dict[str, str]:
    """Module name → weight key of every ``nn.Linear`` of ``backbone`` whose weight is in ``keys``."""
    keys = set(keys)
    weights = {name: f"{name}.weight" if name else "weight" for name, module in backbone.named_modules()
               if isinstance(module, nn.Linear)}
    return {name: key for name, key in weights.items() if key in keys}


def reduce_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """``G̃ = α G + (1 − α) diag(G)``: the off-diagonal entries scaled by ``α``, the diagonal kept."""
    return alpha * gram + (1 - alpha) * torch.diag(gram.diagonal())


class RegMeanSums:
    """One linear layer's ``Σ_k G̃_k`` and ``Σ_k G̃_k τ_kᵀ``, added one expert at a time."""

    def __init__(self):
        self.gram: Tensor | None = None
        self.product: Tensor | None = None

    def add(self, gram: Tensor, tau: Tensor) -> None:
        product = gram @ tau.T
        self.gram = gram if self.gram is None else self.gram + gram
        self.product = product if self.product is None else self.product + product

    def delta(self, mean: Tensor) -> Tensor:
        """``Δᵀ = τ̄ᵀ + (Σ G̃_k)⁺ (Σ G̃_k τ_kᵀ − Σ G̃_k τ̄ᵀ)`` in float64 (``τ̄ = mean``): ``(Σ G̃_k)⁻¹ Σ G̃_k τ_kᵀ``
        when the sum is invertible, the mean along input directions no expert's inputs reach."""
        gram, mean = self.gram.double(), mean.double()
        residual = self.product.double() - gram @ mean.T
        return (mean.T + torch.linalg.pinv(gram, hermitian=True) @ residual).T.float()


def block_names(backbone: nn.Module) -> list[str]:
    """The transformer blocks: the items of the backbone's largest ``nn.ModuleList`` of one class."""
    lists = [(sum(p.numel() for p in module.parameters()), name, len(module)) for name, module in backbone.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1]
    if not lists:
        return []
    _, name, size = max(lists, key=lambda entry: entry[0])
    return [f"{name}.{i}" if name else str(i) for i in range(size)]


def layer_stages(backbone: nn.Module, keys: list[str], layers: dict[str, str]) -> list[list[str]]:
    """RegMean++'s order: the keys outside every layer first, then one group per block or other linear
    module, in the order of ``keys`` (the backbone's)."""
    blocks = block_names(backbone)

    def stage(key: str) -> str | None:
        block = next((b for b in blocks if key.startswith(b + ".")), None)
        module = key.rpartition(".")[0]
        return block if block is not None else module if module in layers else None

    grouped: dict[str | None, list[str]] = {None: []}
    for key in keys:
        grouped.setdefault(stage(key), []).append(key)
    return [group for group in grouped.values() if group]


def _merge_stage(reader: ExpertReader, calibration: Calibration, keys: list[str], layers: dict[str, str],
                 merged: dict[str, Tensor], alpha: float, batches: int) -> dict[str, Tensor]:
    """The merged update of ``keys``: each expert runs its task's batches with ``merged`` (the finished
    layers) and its own ``keys``; RegMean on the linear weights among them, the mean on the rest."""
    modules = {module: key for module, key in layers.items() if key in set(keys)}
    module_of = {key: module for module, key in modules.items()}
    sums = {module: RegMeanSums() for module in modules}
    totals: dict[str, Tensor] = {}
    for name in reader.names:
        taus = {key: tau.to(calibration.device) for key, tau in reader.task_vectors(name, keys)}
        grams = {}
        if modules:
            params = calibration.params({**merged, **_weights(reader, taus, calibration.device)})
            grams = input_grams(calibration, name, params, modules, batches)
        for key, tau in taus.items():
            totals[key] = totals[key] + tau if key in totals else tau
            if module_of.get(key) in grams:
                sums[module_of[key]].add(reduce_off_diagonal(grams[module_of[key]], alpha), tau)
    deltas = {key: total / len(reader.names) for key, total in totals.items()}
    deltas.update({modules[m]: s.delta(deltas[modules[m]]) for m, s in sums.items() if s.gram is not None})
    return deltas


def _weights(reader: ExpertReader, deltas: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """``θ_0 + Δ`` in the pretrained tensors' dtypes, on ``device``."""
    return {key: (reader.base[key].to(device, torch.float32) + delta).to(reader.base[key].dtype)
            for key, delta in deltas.items()}


def _regmean(pretrained: WeightsSource, experts: Experts, calibration: Calibration, alpha: float, batches: int,
             include: Patterns, exclude: Patterns, method: str) -> MergeResult:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{method}: alpha must be in [0, 1], got {alpha}")
    reader = ExpertReader(pretrained, experts, include, exclude)
    calibration.check(reader.names, method)
    layers = linear_layers(calibration.backbone, reader.keys)
    stages = layer_stages(calibration.backbone, reader.keys, layers) if method == "regmean_plusplus" else [reader.keys]
    deltas: dict[str, Tensor] = {}
    for keys in stages:
        merged = _weights(reader, deltas, calibration.device)
        deltas.update(_merge_stage(reader, calibration, keys, layers, merged, alpha, batches))
    return apply_deltas(pretrained, deltas)


@METHODS.register("regmean")
@data_driven
def regmean(
    pretrained: WeightsSource,
    experts: Experts,
    *,
    calibration: Calibration,
    alpha: float = 0.95,
    batches: int = 4,
    include: Patterns = None,
    exclude: Patterns = None,
) -> MergeResult:
    """RegMean: every in-scope linear layer ``Wᵀ = (Σ_k G̃_k)⁻¹ Σ_k G̃_k W_kᵀ`` from each expert's
    input Grams on ``batches`` calibration batches of its own task; the other tensors the mean."""
    return _regmean(pretrained, experts, calibration, alpha, batches, include, exclude, "regmean")


@METHODS.register("regmean_plusplus")
@data_driven
def regmean_plusplus(
    pretrained: WeightsSource,
    experts: Experts,
    *,
    calibration: Calibration,
    alpha: float = 0.95,
    batches: int = 4,
    include: Patterns = None,
    exclude: Patterns = None,
) -> MergeResult:
    """RegMean++: RegMean layer by layer in forward order, each layer's inputs computed by the merged
    earlier layers."""
    return _regmean(pretrained, experts, calibration, alpha, batches, include, exclude, "regmean_plusplus")
