"""The digits zoo: a small pretrained network and one fine-tuned expert per digit domain, built offline.

Everything comes from scikit-learn's bundled ``load_digits()`` (1797 grey 8x8 images), so the
quickstart runs on a bare CPU machine with no download; a build takes a few seconds and is
cached. Each task shows the digits in its own, visibly different *input domain*
(:mod:`adamerge.zoo.digit_domains`) and has its own 10-way classification head.

How the models are made (a miniature of the CLIP setting AdaMerging was proposed for):

- **Backbone** (:class:`DigitsBackbone`): an MLP ``64 -> 128 -> 128 -> 128`` (Linear, LayerNorm,
  ReLU) and a linear projection to a 256-d embedding that is L2-normalised, like CLIP's image
  embedding. No BatchNorm. Layer-wise merging sees 14 tensors (4 Linear, 3 LayerNorm).
- **Pretrained**: trained to classify the digit on a mix of every task's domain (half of the
  train split of each), with a throwaway head. It "knows" all domains, as a foundation model
  would, but not the tasks' heads.
- **Heads**: each task gets its own ``nn.Linear(256, 10)``, initialised as a random class
  embedding of norm ``logit_scale`` (20) and zero bias (CLIP's heads are fixed text
  embeddings). The pretrained backbone with an expert's head is therefore at chance level.
- **Experts**: from the pretrained weights, backbone and head are fine-tuned together on the
  task's train split (Adam, lr 1e-3, 10 epochs, batch 64).

Because every head lives in its own random directions of a normalised 256-d space, another
task's vector mostly makes a task's predictions *less confident* rather than confidently
wrong, so prediction entropy on unlabelled inputs tracks accuracy (the AdaMerging premise).

Splits: the 1797 images are split once per ``seed`` (stratified by digit) into *train* (55%,
all training of the pretrained model and the experts), *calibration* (15%, unlabelled inputs
for learning merge coefficients; labelled, the *validation* split) and *test* (30%, labelled,
held out). Every task uses the same images in its own domain, so the three splits are disjoint
for every task. Inputs are float32 ``[N, 64]`` in ``[0, 1]`` (row-major 8x8); the backbone
also accepts ``[N, 8, 8]`` and ``[N, 1, 8, 8]``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from adamerge.io.checkpoints import atomic_directory, save_safetensors, write_text
from adamerge.io.paths import cache_root
from adamerge.zoo.digit_domains import TASK_SPECS, DigitTask, make_data

FORMAT = "adamerge.zoo.digits"
VERSION = 1
DEFAULT_TASKS = ("upright", "rotated", "inverted", "mirrored", "noisy")


# ---------------------------------------------------------------------- model


class DigitsBackbone(nn.Module):
    """``pixels -> L2-normalised embedding``: (Linear, LayerNorm, ReLU) per hidden layer, then a projection.

    Parameters are ``layers.<i>.{weight,bias}`` and ``norms.<i>.{weight,bias}``, one numbered
    block per layer. Accepts ``[B, 64]``, ``[B, 8, 8]`` or ``[B, 1, 8, 8]`` floats.
    """

    def __init__(self, hidden: Sequence[int] = (128, 128, 128), features: int = 256, inputs: int = 64):
        super().__init__()
        sizes = [inputs, *hidden, features]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.norms = nn.ModuleList(nn.LayerNorm(size) for size in hidden)
        self.features = features

    def forward(self, pixels: Tensor) -> Tensor:
        x = pixels.flatten(1).float()
        for layer, norm in zip(self.layers, self.norms):
            x = torch.relu(norm(layer(x)))
        return nn.functional.normalize(self.layers[-1](x), dim=-1)


# ---------------------------------------------------------------------- settings and zoo


@dataclass(frozen=True)
class DigitsZooSettings:
    """Everything that determines the zoo (stored in the manifest and checked when loading)."""

    seed: int = 0
    tasks: tuple[str, ...] = DEFAULT_TASKS
    hidden: tuple[int, ...] = (128, 128, 128)
    features: int = 256
    logit_scale: float = 20.0  # norm of each head's initial class embeddings
    test_fraction: float = 0.3
    calibration_fraction: float = 0.15
    pretrain_fraction: float = 0.5  # of each domain's train split
    pretrain_epochs: int = 20
    pretrain_lr: float = 1e-3
    finetune_epochs: int = 10
    finetune_lr: float = 1e-3
    batch_size: int = 64

    def to_json(self) -> dict:
        data = asdict(self)
        data["tasks"] = list(self.tasks)
        data["hidden"] = list(self.hidden)
        return data


@dataclass
class DigitsZoo:
    """A pretrained backbone, one expert backbone and head per task, and each task's data.

    - ``pretrained``: the pretrained :class:`DigitsBackbone` (eval mode).
    - ``experts``: ``task -> fine-tuned DigitsBackbone`` (same architecture, eval mode).
    - ``heads``: ``task -> nn.Linear(256, 10)``, the expert's own (fine-tuned) head.
    - ``tasks``: ``task -> DigitTask`` (domain description, number of classes).
    - ``calibration``: ``task -> [N_cal, 64]`` float32 inputs, **unlabelled**, for learning merge
      coefficients; a split of its own, disjoint from train and test (``calibration_labels``: their digits).
    - ``test_inputs`` / ``test_labels``: ``task -> [N_test, 64]`` float32 and ``[N_test]`` int64,
      never used in training.
    - ``train_inputs`` / ``train_labels``: what the experts were fine-tuned on.
    - ``cache_dir``: where the weights are (``None`` when built with ``cache=False``);
      ``pretrained_file``, ``expert_files`` and ``heads_file`` point at the safetensors files.

    :meth:`dataset` converts a split to a ``datasets.Dataset`` (``pixels``: 64 floats, and
    ``label`` except for calibration).
    """

    settings: DigitsZooSettings
    pretrained: DigitsBackbone
    experts: dict[str, DigitsBackbone]
    heads: dict[str, nn.Linear]
    tasks: dict[str, DigitTask]
    calibration: dict[str, Tensor]
    calibration_labels: dict[str, Tensor]
    test_inputs: dict[str, Tensor]
    test_labels: dict[str, Tensor]
    train_inputs: dict[str, Tensor]
    train_labels: dict[str, Tensor]
    cache_dir: Path | None = None

    @property
    def seed(self) -> int:
        return self.settings.seed

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def make_backbone(self) -> DigitsBackbone:
        """A fresh, randomly initialised backbone of the zoo's architecture."""
        return DigitsBackbone(self.settings.hidden, self.settings.features)

    @property
    def pretrained_file(self) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / "pretrained.safetensors"

    @property
    def expert_files(self) -> dict[str, Path]:
        if self.cache_dir is None:
            return {}
        return {task: self.cache_dir / _expert_file(task) for task in self.tasks}

    @property
    def heads_file(self) -> Path | None:
        """One safetensors file holding every head as ``<task>.weight`` / ``<task>.bias``."""
        return None if self.cache_dir is None else self.cache_dir / "heads.safetensors"

    def dataset(self, task: str, split: str = "test"):
        """A task's split as a ``datasets.Dataset``: ``calibration``, ``validation`` (it, labelled), ``test`` or ``train``."""
        import datasets

        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; this zoo has {list(self.tasks)}")
        if split == "calibration":
            return datasets.Dataset.from_dict({"pixels": self.calibration[task].tolist()})
        splits = {"validation": (self.calibration, self.calibration_labels), "test": (self.test_inputs, self.test_labels),
                  "train": (self.train_inputs, self.train_labels)}
        if split not in splits:
            raise ValueError(f"unknown split {split!r}; use 'calibration', 'validation', 'test' or 'train'")
        inputs, labels = (part[task] for part in splits[split])
        return datasets.Dataset.from_dict({"pixels": inputs.tolist(), "label": labels.tolist()})


def default_cache_dir() -> Path:
    """``$ADAMERGE_CACHE/zoo/digits``; ``ADAMERGE_CACHE`` defaults to ``~/.cache/adamerge``."""
    return cache_root() / "zoo" / "digits"


def _expert_file(task: str) -> str:
    return f"expert_{task}.safetensors"


# ---------------------------------------------------------------------- training


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny matrices train fastest on one thread, and a shared CPU cannot slow a build 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _new_head(features: int, classes: int, scale: float, generator: torch.Generator) -> nn.Linear:
    head = nn.Linear(features, classes)
    with torch.no_grad():
        directions = torch.randn(classes, features, generator=generator)
        head.weight.copy_(scale * nn.functional.normalize(directions, dim=-1))
        head.bias.zero_()
    return head


def _fit(
    backbone: nn.Module,
    head: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    backbone.train()
    head.train()
    optimiser = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), batch_size):
            batch = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(head(backbone(inputs[batch])), labels[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    backbone.eval()
    head.eval()


def _train_models(
    settings: DigitsZooSettings, data: Mapping[str, Mapping[str, tuple[Tensor, Tensor]]]
) -> tuple[DigitsBackbone, dict[str, DigitsBackbone], dict[str, nn.Linear]]:
    with torch.random.fork_rng(devices=[]), _one_thread():
        torch.manual_seed(settings.seed)  # parameter initialisation
        generator = torch.Generator().manual_seed(settings.seed)  # heads and batch order

        # pretraining: the digit, on a mix of every task's domain
        pretrained = DigitsBackbone(settings.hidden, settings.features)
        xs, ys = [], []
        for name in settings.tasks:
            inputs, digits = data[name]["train"]
            count = max(1, int(round(settings.pretrain_fraction * len(inputs))))
            chosen = torch.randperm(len(inputs), generator=generator)[:count]
            xs.append(inputs[chosen])
            ys.append(digits[chosen])
        pretrain_head = _new_head(settings.features, 10, settings.logit_scale, generator)
        _fit(pretrained, pretrain_head, torch.cat(xs), torch.cat(ys), settings.pretrain_epochs,
             settings.pretrain_lr, settings.batch_size, generator)

        # experts: backbone + a new head, fine-tuned together on one task
        experts: dict[str, DigitsBackbone] = {}
        heads: dict[str, nn.Linear] = {}
        for name in settings.tasks:
            inputs, labels = data[name]["train"]
            expert = DigitsBackbone(settings.hidden, settings.features)
            expert.load_state_dict(pretrained.state_dict())
            head = _new_head(settings.features, TASK_SPECS[name].num_classes, settings.logit_scale, generator)
            _fit(expert, head, inputs, labels, settings.finetune_epochs, settings.finetune_lr,
                 settings.batch_size, generator)
            experts[name] = expert
            heads[name] = head
    return pretrained, experts, heads


# ---------------------------------------------------------------------- cache


def _manifest(settings: DigitsZooSettings) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "settings": settings.to_json(),
        "tasks": {name: {"domain": TASK_SPECS[name].domain, "num_classes": TASK_SPECS[name].num_classes}
                  for name in settings.tasks},
        "files": {
            "pretrained": "pretrained.safetensors",
            "experts": {name: _expert_file(name) for name in settings.tasks},
            "heads": "heads.safetensors",
        },
        "torch": torch.__version__,
    }


def _save(directory: Path, settings: DigitsZooSettings, pretrained, experts, heads) -> None:
    metadata = {"format": FORMAT, "seed": str(settings.seed)}
    save_safetensors(pretrained.state_dict(), directory / "pretrained.safetensors", metadata=metadata)
    for name, expert in experts.items():
        save_safetensors(expert.state_dict(), directory / _expert_file(name), metadata={**metadata, "task": name})
    head_tensors = {f"{name}.{key}": t for name, head in heads.items() for key, t in head.state_dict().items()}
    save_safetensors(head_tensors, directory / "heads.safetensors", metadata=metadata)
    write_text(directory / "manifest.json", json.dumps(_manifest(settings), indent=1))


def _matches(directory: Path, settings: DigitsZooSettings) -> bool:
    """Whether ``directory`` has a manifest for exactly these settings."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(manifest, dict)
        and manifest.get("format") == FORMAT
        and manifest.get("version") == VERSION
        and manifest.get("settings") == settings.to_json()
    )


def _load(directory: Path, settings: DigitsZooSettings):
    pretrained = DigitsBackbone(settings.hidden, settings.features)
    pretrained.load_state_dict(load_file(str(directory / "pretrained.safetensors")))
    head_tensors = load_file(str(directory / "heads.safetensors"))
    experts, heads = {}, {}
    for name in settings.tasks:
        expert = DigitsBackbone(settings.hidden, settings.features)
        expert.load_state_dict(load_file(str(directory / _expert_file(name))))
        experts[name] = expert.eval()
        head = nn.Linear(settings.features, TASK_SPECS[name].num_classes)
        head.load_state_dict({key: head_tensors[f"{name}.{key}"] for key in ("weight", "bias")})
        heads[name] = head.eval()
    return pretrained.eval(), experts, heads


# ---------------------------------------------------------------------- build


def build_digits_zoo(
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    tasks: Sequence[str] | None = None,
    rebuild: bool = False,
    cache: bool = True,
    **settings,
) -> DigitsZoo:
    """Build the digits zoo, or load it from the cache.

    ``cache_dir`` defaults to :func:`default_cache_dir`. The cache is used only when its
    manifest matches ``seed``, ``tasks`` and every other setting (``settings`` are fields of
    :class:`DigitsZooSettings`); otherwise, or with ``rebuild=True``, the zoo is trained again
    and the folder replaced atomically. ``cache=False`` neither reads nor writes anything.
    ``tasks`` are names from :data:`TASK_SPECS` (default: the five of :data:`DEFAULT_TASKS`).
    Training runs on one CPU thread and takes a few seconds; the same seed gives the same
    weights on the same machine and library versions.
    """
    names = tuple(tasks) if tasks is not None else DEFAULT_TASKS
    unknown = [name for name in names if name not in TASK_SPECS]
    if unknown or not names:
        raise ValueError(f"unknown digits task(s) {unknown}; choose from {list(TASK_SPECS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"digits tasks must be unique, got {list(names)}")
    known = set(DigitsZooSettings.__dataclass_fields__) - {"seed", "tasks"}
    if set(settings) - known:
        raise TypeError(f"unknown digits zoo setting(s) {sorted(set(settings) - known)}; known: {sorted(known)}")
    if "hidden" in settings:
        settings["hidden"] = tuple(settings["hidden"])
    config = DigitsZooSettings(seed=int(seed), tasks=names, **settings)
    data = make_data(config, names)

    directory = None
    if cache:
        directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    models = None
    if directory is not None and not rebuild and _matches(directory, config):
        try:
            models = _load(directory, config)
        except (OSError, KeyError, RuntimeError, ValueError, SafetensorError):
            models = None  # damaged cache: build again
    if models is None:
        models = _train_models(config, data)
        if directory is not None:
            with atomic_directory(directory) as staging:
                _save(staging, config, *models)
    pretrained, experts, heads = models
    return DigitsZoo(
        settings=config,
        pretrained=pretrained,
        experts=experts,
        heads=heads,
        tasks={name: TASK_SPECS[name] for name in names},
        calibration={name: data[name]["calibration"][0] for name in names},
        calibration_labels={name: data[name]["calibration"][1] for name in names},
        test_inputs={name: data[name]["test"][0] for name in names},
        test_labels={name: data[name]["test"][1] for name in names},
        train_inputs={name: data[name]["train"][0] for name in names},
        train_labels={name: data[name]["train"][1] for name in names},
        cache_dir=directory,
    )
