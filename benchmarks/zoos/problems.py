"""The benchmark zoos as problem kinds, named in recipes by dotted path
(``problem.kind: benchmarks.zoos.problems:text_zoo_problem``; run from the repository root).

Each one reads a built zoo and hands it to adamerge's own kind (sequence classification, causal
LM); a zoo not built yet is named in one line with the command that builds it.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from adamerge.app.checks import check_name
from adamerge.app.config import DataSourceConfig, ProblemConfig, TaskConfig
from adamerge.app.problems.causal_lm import causal_lm_problem
from adamerge.app.problems.problem import MergeProblem
from adamerge.app.problems.sequence_classification import sequence_classification_problem

TEXT_DATA = os.environ.get("ADAMERGE_TEXT_DATA", "../shared/data/text")  # the shared text tasks


def text_zoo_problem(config: ProblemConfig, streamed: bool = False) -> MergeProblem:
    """The MiniLM text zoo (:mod:`benchmarks.zoos.text`): sequence-classification experts in
    ``<zoo_dir>/<task>/`` with data in ``<data_root>/<task>/{train,test}.jsonl`` (+ ``meta.json``
    saying whether it has sentence pairs). ``problem.options``: ``data_root``, ``zoo_dir``,
    ``tasks`` (default: every expert in the zoo), ``calibration``, ``evaluation`` and ``validation``
    (``{split, max_samples, skip, shuffle}``; no validation rows unless given)."""
    data_root, zoo_dir = _text_zoo_folders(config.options)
    build = f"python -m benchmarks.zoos.text --data {data_root} --out {zoo_dir}"
    if not zoo_dir.is_dir():
        raise FileNotFoundError(f"text zoo {zoo_dir} does not exist: build it with `{build}`")
    names = config.options.get("tasks") or sorted(
        p.name for p in zoo_dir.iterdir() if not p.name.startswith(".") and (p / "config.json").exists()
    )
    calibration = DataSourceConfig(**{"split": "test", **dict(config.options.get("calibration") or {})})
    evaluation = DataSourceConfig(**{"split": "test", **dict(config.options.get("evaluation") or {})})
    validation = DataSourceConfig(**config.options["validation"]) if config.options.get("validation") else None
    tasks = {}
    for name in names:
        check_name(name, "problem.options.tasks")
        if not (zoo_dir / name).is_dir():
            raise FileNotFoundError(f"expert {name!r} {zoo_dir / name} does not exist: build it with `{build}`")
        meta_file = data_root / name / "meta.json"
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        tasks[name] = TaskConfig(
            expert=str(zoo_dir / name),
            label_names=meta.get("label_names"),
            calibration=replace(calibration, path=str(data_root / name)),
            evaluation=replace(evaluation, path=str(data_root / name)),
            validation=replace(validation, path=str(data_root / name)) if validation is not None else None,
            text_pair="text_pair" if meta.get("pair", False) else None,
            weight=config.tasks[name].weight if name in config.tasks else 1.0,
        )
    expanded = replace(config, kind="hf_sequence_classification", tasks=tasks, options={})
    return sequence_classification_problem(expanded, streamed=streamed)


def _text_zoo_folders(options: dict) -> tuple[Path, Path]:
    known = {"data_root", "zoo_dir", "tasks", "calibration", "evaluation", "validation"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"problem.options: unknown key(s) {unknown} for the text zoo; known: {sorted(known)}")
    if "data_root" not in options or "zoo_dir" not in options:
        raise ValueError("the text zoo needs problem.options.data_root and problem.options.zoo_dir")
    data_root = Path(options["data_root"]).expanduser()
    if not data_root.is_dir():
        raise FileNotFoundError(f"text zoo: data_root {data_root} does not exist (set ADAMERGE_TEXT_DATA)")
    return data_root, Path(options["zoo_dir"]).expanduser()


def smollm2_zoo_problem(config: ProblemConfig, streamed: bool = False) -> MergeProblem:
    """The SmolLM2 zoo (:mod:`benchmarks.zoos.lm`) in ``problem.cache_dir``, merged as adamerge's
    ``hf_causal_lm`` kind merges any causal LMs (the recipe names the pretrained model, experts and
    data); its shared start and experts must be built."""
    build = f"python -m benchmarks.zoos.lm --data {TEXT_DATA} --out {config.cache_dir}"
    folders = {"pretrained model": config.pretrained}
    folders.update({f"expert {name!r}": task.expert for name, task in config.tasks.items() if task.expert})
    for role, folder in folders.items():
        if folder and not Path(folder).expanduser().is_dir():
            raise FileNotFoundError(f"{role} {folder} does not exist: build the SmolLM2 zoo with `{build}`")
    return causal_lm_problem(replace(config, kind="hf_causal_lm"), streamed=streamed)
