"""mergekit in: the adamerge recipe of a mergekit YAML, for ``adamerge merge|fit --from-mergekit``:
the equal data-free ``method``, or a learned merge whose ``coefficients.init`` is the YAML's weights;
what has no equal is refused naming the key, never a different merge in silence.

Building a recipe reads and writes no run: per-tensor starting weights are values in the recipe,
which the job turns into its coefficients (``app.builders``), so a recipe that fails to load leaves nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig

from adamerge.app.config import load_recipe, resolve_recipe, to_plain
from adamerge.app.mergekit.config import MergekitMerge, expert_names, read_mergekit

CAUSAL_LM = ("ForCausalLM", "LMHeadModel")


def merge_recipe(path: str | Path, overrides: Sequence[str] = ()) -> tuple[DictConfig, list[str]]:
    """The data-free recipe that merges what mergekit merges from ``path``, and notes to show."""
    merge = read_mergekit(path)
    method, args = merge.data_free()
    config = Path(merge.base).expanduser() / "config.json"
    if config.is_file():
        architectures = json.loads(config.read_text()).get("architectures") or []
        if not any(a.endswith(CAUSAL_LM) for a in architectures):
            raise ValueError(f"{merge.where}: base_model {merge.base} is {architectures}, not a causal LM; "
                             "for other models write a recipe (`adamerge init`)")
    recipe = {
        "name": expert_names([Path(path).stem])[0],
        "method": {"name": method, "args": args},
        "problem": {"kind": "hf_causal_lm", "pretrained": merge.base,
                    "tasks": {name: {"expert": p} for name, p in merge.experts.items()}},
    }
    return load_recipe(recipe, list(overrides)), merge.notes


def _same(one: str, other: str) -> bool:
    """Two model references name the same model (the same folder, or the same hub id)."""
    a, b = Path(one).expanduser(), Path(other).expanduser()
    return a.resolve() == b.resolve() if a.exists() and b.exists() else one == other


def fit_recipe(path: str | Path, source: str, overrides: Sequence[str] = ()) -> tuple[DictConfig, list[str]]:
    """``source`` started from ``path``'s weights: its pretrained model must be the YAML's base and its
    experts among the YAML's models (the others join as experts without a task). Weights that vary over
    tensors start layer/chunk/element-wise coefficients from their values per tensor."""
    merge = read_mergekit(path)
    values = merge.initial()
    plain = to_plain(load_recipe(resolve_recipe(source), list(overrides)))
    problem = plain["problem"]
    if problem["pretrained"] is None:
        problem["pretrained"] = merge.base
    elif not _same(problem["pretrained"], merge.base):
        raise ValueError(f"problem.pretrained {problem['pretrained']} is not {merge.where}'s base model {merge.base}")
    ours = {**{n: t["expert"] for n, t in problem["tasks"].items() if t.get("expert")}, **problem["experts"]}
    paths = list(merge.experts.values())
    rows = {}
    for name, expert in ours.items():
        match = [k for k, p in enumerate(paths) if _same(expert, p)]
        if not match:
            raise ValueError(f"problem expert {name!r} ({expert}) is not among {merge.where}'s models")
        rows[name] = match[0]
    for k, name in enumerate(merge.experts):
        if k not in rows.values():
            name = name if name not in rows else f"{name}_mergekit"
            problem["experts"][name], rows[name] = paths[k], k
    init = values[list(rows.values())]
    plain["coefficients"]["init"] = _init(merge, init, list(rows), plain["coefficients"]["granularity"])
    return load_recipe(plain), merge.notes


def _init(merge: MergekitMerge, init: torch.Tensor, names: list[str], granularity: str) -> dict:
    """One value per expert where the weights are constant over tensors, else one per expert and
    tensor (``{expert: {tensor: value}}``), which layer, chunk and element-wise coefficients start from exactly."""
    if (init - init[:, :1]).abs().max() <= 1e-12:
        return {name: float(row[0]) for name, row in zip(names, init)}
    if granularity not in ("layer", "chunk", "element"):
        raise ValueError(f"coefficients.granularity {granularity}: {merge.where}'s weights vary over tensors, which "
                         f"{granularity}-wise coefficients cannot start from exactly; use layer, chunk or element")
    return {name: {key: float(value) for key, value in zip(merge.shapes, row)} for name, row in zip(names, init)}
