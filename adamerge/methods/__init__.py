"""Merges with fixed coefficients, data-free or data-driven, one module per method, registered by name.

Every method computes a merged task vector per tensor and returns ``θ_0 + merged``: an
``nn.Module`` (a merged copy) when ``pretrained`` is a module, else a state dict. Tensors
outside the merge scope keep their pretrained values. ``τ_k = θ_k − θ_0``, ``K`` experts.

- ``average``:          ``θ_0 + (1/K) Σ_k τ_k`` (the mean of the experts' weights).
- ``task_arithmetic``:  ``θ_0 + Σ_k λ_k τ_k`` (Ilharco et al., 2023), ``λ_k`` a scalar or one per expert.
- ``ties``:             trim, elect sign, disjoint mean, ``× λ`` (Yadav et al., 2023).
- ``dare``:             drop-and-rescale, then task arithmetic or TIES election (Yu et al., 2024).
- ``lines``:            ``θ_0 + (α + β (ℓ − 1)/(L − 1)) Σ_k τ_k`` by block depth (Wang et al., 2025).
- ``tsv``:              TSV-M, whitened per-task top-``⌊r/K⌋`` singular components (Gargiulo et al., 2025).
- ``iso_c``:            ``Σ_k τ_k`` with a flat spectrum (Marczak et al., 2025).
- ``iso_cts``:          common + task-specific singular directions, flat spectrum (Marczak et al., 2025).
- ``wudi``:             per linear layer, Adam on ``Σ_k ‖(τ_m − τ_k) τ_kᵀ‖²/‖τ_k‖²`` (Cheng et al., 2025).
- ``sequential_projection``: OPCM, the experts folded in one at a time, each projected away from
  the merge so far, rescaled to the mean ``‖τ_k‖`` (Tang et al., 2025).

Data-driven methods (``calibration.data_driven``) also run each expert on a few unlabelled inputs
of its own task (a :class:`~adamerge.methods.calibration.Calibration`, built by ``adamerge merge``):

- ``regmean``:          per linear layer ``Wᵀ = (Σ_k G̃_k)⁻¹ Σ_k G̃_k W_kᵀ`` from input Grams (Jin et al., 2023).
- ``regmean_plusplus``: the same layer by layer, inputs from the merged earlier layers (Nguyen et al., 2025).
- ``fisher``:           per entry ``Σ_k F_k θ_k / Σ_k F_k``, diagonal Fisher weights (Matena & Raffel, 2022).

Each method's module (``adamerge/methods/<name>.py``) documents the exact definition, the
paper's defaults and what happens to non-matrix tensors; the ``*_delta`` functions compute
one tensor's merged update from stacked task vectors ``[K, m, n]`` (the registered methods
are thin wrappers over them). ``base`` holds the registry (``METHODS``), ``svd`` the shared
SVD helpers, ``experts`` the reading of one expert at a time, ``calibration`` what data-driven
methods run on.
"""

from adamerge.methods.base import METHODS, MergeResult, apply_deltas, embedding_keys
from adamerge.methods.average import average
from adamerge.methods.dare import dare
from adamerge.methods.fisher import fisher
from adamerge.methods.iso_c import iso_c, iso_c_delta
from adamerge.methods.iso_cts import iso_cts, iso_cts_components, iso_cts_delta, iso_cts_sizes
from adamerge.methods.lines import layer_depths, lines
from adamerge.methods.regmean import regmean, regmean_plusplus
from adamerge.methods.sequential_projection import sequential_projection
from adamerge.methods.task_arithmetic import task_arithmetic
from adamerge.methods.ties import ties
from adamerge.methods.tsv import tsv, tsv_components, tsv_delta
from adamerge.methods.wudi import wudi, wudi_delta, wudi_loss

__all__ = [
    "METHODS",
    "MergeResult",
    "apply_deltas",
    "average",
    "dare",
    "embedding_keys",
    "fisher",
    "iso_c",
    "iso_c_delta",
    "iso_cts",
    "iso_cts_components",
    "iso_cts_delta",
    "iso_cts_sizes",
    "layer_depths",
    "lines",
    "regmean",
    "regmean_plusplus",
    "sequential_projection",
    "task_arithmetic",
    "ties",
    "tsv",
    "tsv_components",
    "tsv_delta",
    "wudi",
    "wudi_delta",
    "wudi_loss",
]
