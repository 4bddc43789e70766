"""The digits zoo: a tiny pretrained MLP and one fine-tuned expert per digit task, built offline.

Everything comes from scikit-learn's bundled ``load_digits()`` (1797 grey 8x8 images), so the
quickstart runs on a bare CPU machine with no download. Each task shows the digits in its own
*input domain* and asks its own *question*:

=============  ======================================  ===================  =======
task           inputs (domain)                          label                classes
=============  ======================================  ===================  =======
``upright``    the original images                      the digit            10
``rotated``    rotated 90 degrees counter-clockwise     the digit            10
``inverted``   intensity inverted (``1 - x``)           the digit mod 3      3
``mirrored``   mirrored left-right                      odd / even           2
``noisy``      shifted one pixel + Gaussian noise       digit >= 5           2
=============  ======================================  ===================  =======

The *pretrained* backbone learns digit classification on upright images (with a throwaway
head); every expert then starts from it, fits a fresh linear head on the frozen pretrained
features for a moment, and fine-tunes backbone and head together on its own task. The experts
therefore share a basin, and their task vectors pull the same layers in different directions.

Splits: the 1797 images are split once (stratified by digit, from ``seed``) into *train*
(the experts and the pretrained model learn on these), *calibration* (unlabelled inputs for
learning merge coefficients) and *test* (labelled, held out). All tasks use the same images
in their own domain, so the three splits are disjoint for every task. Pixels are floats in
``[0, 1]``, flattened to 64 values; the backbone accepts ``[B, 64]``, ``[B, 8, 8]`` or
``[B, 1, 8, 8]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from adamerge.checkpoints import atomic_directory, save_safetensors, write_text

FORMAT = "adamerge.zoo.digits"
VERSION = 1
TASKS = ("upright", "rotated", "inverted", "mirrored", "noisy")


# ---------------------------------------------------------------------- tasks


def _digit(y: np.ndarray) -> np.ndarray:
    return y


def _mod3(y: np.ndarray) -> np.ndarray:
    return y % 3


def _parity(y: np.ndarray) -> np.ndarray:
    return y % 2


def _at_least_five(y: np.ndarray) -> np.ndarray:
    return (y >= 5).astype(y.dtype)


def _identity(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return images


def _rotate(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.rot90(images, k=1, axes=(1, 2))


def _invert(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 1.0 - images


def _mirror(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return images[:, :, ::-1]


def _shift_noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    shifted = np.roll(images, shift=(1, 1), axis=(1, 2))
    return np.clip(shifted + rng.normal(0.0, 0.2, size=images.shape), 0.0, 1.0)


@dataclass(frozen=True)
class DigitTask:
    """One task of the zoo: how its inputs look and what its label means."""

    name: str
    domain: str
    label: str
    num_classes: int
    transform: Callable[[np.ndarray, np.random.Generator], np.ndarray] = field(repr=False, compare=False)
    relabel: Callable[[np.ndarray], np.ndarray] = field(repr=False, compare=False)


TASK_SPECS: dict[str, DigitTask] = {
    "upright": DigitTask("upright", "original", "digit", 10, _identity, _digit),
    "rotated": DigitTask("rotated", "rotated 90 degrees", "digit", 10, _rotate, _digit),
    "inverted": DigitTask("inverted", "inverted intensity", "digit mod 3", 3, _invert, _mod3),
    "mirrored": DigitTask("mirrored", "mirrored left-right", "parity", 2, _mirror, _parity),
    "noisy": DigitTask("noisy", "shifted + noise", "digit >= 5", 2, _shift_noise, _at_least_five),
}


# ---------------------------------------------------------------------- model


class DigitsBackbone(nn.Module):
    """An MLP ``64 -> hidden... -> features``: each layer is Linear, LayerNorm (optional), ReLU.

    Parameters are named ``layers.<i>.weight`` / ``layers.<i>.bias`` (and ``norms.<i>.*``),
    one numbered block per layer, so layer-wise merge coefficients see every tensor apart.
    """

    def __init__(self, hidden: Sequence[int] = (128, 128, 128), features: int = 64, inputs: int = 64, norm: bool = True):
        super().__init__()
        sizes = [inputs, *hidden, features]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.norms = nn.ModuleList(nn.LayerNorm(b) for b in sizes[1:]) if norm else None
        self.features = features

    def forward(self, pixels: Tensor) -> Tensor:
        x = pixels.flatten(1).float()
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.norms is not None:
                x = self.norms[i](x)
            x = torch.relu(x)
        return x


# ---------------------------------------------------------------------- settings and zoo


@dataclass(frozen=True)
class DigitsZooSettings:
    """Everything that determines the zoo's weights (stored in the manifest and checked on load)."""

    seed: int = 0
    tasks: tuple[str, ...] = TASKS
    hidden: tuple[int, ...] = (128, 128, 128)
    features: int = 64
    norm: bool = True
    test_fraction: float = 0.3
    calibration_fraction: float = 0.15
    pretrain_fraction: float = 0.5  # of the train split; the pretrained model sees upright digits only
    pretrain_epochs: int = 20
    pretrain_lr: float = 1e-3
    probe_epochs: int = 5  # fresh head on frozen pretrained features, before fine-tuning
    finetune_epochs: int = 10
    finetune_lr: float = 1e-3
    batch_size: int = 64

    def to_json(self) -> dict:
        data = asdict(self)
        data["tasks"] = list(self.tasks)
        data["hidden"] = list(self.hidden)
        return data

    @classmethod
    def from_json(cls, data: Mapping) -> "DigitsZooSettings":
        data = dict(data)
        data["tasks"] = tuple(data["tasks"])
        data["hidden"] = tuple(data["hidden"])
        return cls(**data)


@dataclass
class DigitsZoo:
    """A pretrained backbone, one expert backbone and head per task, and each task's data.

    - ``pretrained``: the pretrained :class:`DigitsBackbone` (eval mode).
    - ``experts``: ``task -> fine-tuned backbone`` (same architecture, eval mode).
    - ``heads``: ``task -> nn.Linear(features, num_classes)``, each expert's own head.
    - ``pretrained_file`` / ``expert_files``: the cached safetensors files of those backbones
      (usable wherever a weights path is accepted).
    - ``calibration``: ``task -> [N_cal, 64]`` float inputs, *unlabelled*, for learning merge
      coefficients (a split of its own, disjoint from train and test).
    - ``test_inputs`` / ``test_labels``: ``task -> [N_test, 64]`` floats and ``[N_test]`` int64
      labels, held out from all training.
    - ``train_inputs`` / ``train_labels``: what the experts were fine-tuned on.
    - ``tasks``: ``task -> DigitTask`` (domain, label meaning, number of classes).

    :meth:`dataset` turns any split into a ``datasets.Dataset`` with a ``pixels`` column (64
    floats) and, except for calibration, a ``label`` column.
    """

    settings: DigitsZooSettings
    pretrained: nn.Module
    experts: dict[str, nn.Module]
    heads: dict[str, nn.Linear]
    tasks: dict[str, DigitTask]
    calibration: dict[str, Tensor]
    test_inputs: dict[str, Tensor]
    test_labels: dict[str, Tensor]
    train_inputs: dict[str, Tensor]
    train_labels: dict[str, Tensor]
    cache_dir: Path | None = None

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    @property
    def seed(self) -> int:
        return self.settings.seed

    def make_backbone(self) -> DigitsBackbone:
        """A fresh (randomly initialised) backbone of the zoo's architecture."""
        return DigitsBackbone(self.settings.hidden, self.settings.features, norm=self.settings.norm)

    @property
    def pretrained_file(self) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / "pretrained.safetensors"

    @property
    def expert_files(self) -> dict[str, Path]:
        if self.cache_dir is None:
            return {}
        return {task: self.cache_dir / f"expert_{task}.safetensors" for task in self.tasks}

    def dataset(self, task: str, split: str = "test"):
        """One task's ``calibration``, ``test`` or ``train`` split as a ``datasets.Dataset``."""
        import datasets

        if split == "calibration":
            return datasets.Dataset.from_dict({"pixels": self.calibration[task].tolist()})
        if split == "test":
            inputs, labels = self.test_inputs[task], self.test_labels[task]
        elif split == "train":
            inputs, labels = self.train_inputs[task], self.train_labels[task]
        else:
            raise ValueError(f"unknown split {split!r}; use 'calibration', 'test' or 'train'")
        return datasets.Dataset.from_dict({"pixels": inputs.tolist(), "label": labels.tolist()})


def default_cache_dir() -> Path:
    """``$ADAMERGE_CACHE/zoo/digits`` (``ADAMERGE_CACHE`` defaults to ``~/.cache/adamerge``)."""
    root = os.environ.get("ADAMERGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "adamerge")
    return Path(root) / "zoo" / "digits"


# ---------------------------------------------------------------------- data


@dataclass
class _Split:
    images: np.ndarray  # [N, 8, 8] in [0, 1]
    digits: np.ndarray  # [N]


def _split_indices(digits: np.ndarray, settings: DigitsZooSettings) -> dict[str, np.ndarray]:
    """Stratified by digit: every split holds each digit in proportion."""
    rng = np.random.default_rng(settings.seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "calibration": [], "test": []}
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(digits == digit))
        n_test = int(round(settings.test_fraction * len(members)))
        n_cal = int(round(settings.calibration_fraction * len(members)))
        parts["test"].append(members[:n_test])
        parts["calibration"].append(members[n_test : n_test + n_cal])
        parts["train"].append(members[n_test + n_cal :])
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


def _load_splits(settings: DigitsZooSettings) -> dict[str, _Split]:
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = (raw.images / 16.0).astype(np.float64)
    digits = raw.target.astype(np.int64)
    return {name: _Split(images[idx], digits[idx]) for name, idx in _split_indices(digits, settings).items()}


def _task_data(task: DigitTask, split: _Split, seed: int, split_name: str) -> tuple[Tensor, Tensor]:
    # one generator per (seed, task, split): noise is reproducible and independent of task order
    key = [seed, TASKS.index(task.name) if task.name in TASKS else 99, ["train", "calibration", "test"].index(split_name)]
    rng = np.random.default_rng(key)
    images = np.ascontiguousarray(task.transform(split.images, rng))
    inputs = torch.from_numpy(images.reshape(len(images), 64).astype(np.float32))
    labels = torch.from_numpy(task.relabel(split.digits).astype(np.int64))
    return inputs, labels


# ---------------------------------------------------------------------- training


def _train(
    parameters: list[nn.Parameter],
    forward: Callable[[Tensor], Tensor],
    inputs: Tensor,
    labels: Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    optimiser = torch.optim.Adam(parameters, lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(inputs), batch_size):
            batch = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(forward(inputs[batch]), labels[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()


def _train_models(
    settings: DigitsZooSettings, splits: dict[str, _Split], data: dict[str, dict[str, tuple[Tensor, Tensor]]]
) -> tuple[DigitsBackbone, dict[str, DigitsBackbone], dict[str, nn.Linear]]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        generator = torch.Generator().manual_seed(settings.seed)
        pretrained = DigitsBackbone(settings.hidden, settings.features, norm=settings.norm)
        pretrain_head = nn.Linear(settings.features, 10)

        # pretraining: upright digits, part of the train split
        train = splits["train"]
        count = max(1, int(round(settings.pretrain_fraction * len(train.digits))))
        chosen = torch.randperm(len(train.digits), generator=generator)[:count]
        upright, digits = _task_data(TASK_SPECS["upright"], train, settings.seed, "train")
        _train(
            [*pretrained.parameters(), *pretrain_head.parameters()],
            lambda x: pretrain_head(pretrained(x)),
            upright[chosen],
            digits[chosen],
            settings.pretrain_epochs,
            settings.pretrain_lr,
            settings.batch_size,
            generator,
        )
        pretrained.eval()

        experts: dict[str, DigitsBackbone] = {}
        heads: dict[str, nn.Linear] = {}
        for name in settings.tasks:
            task = TASK_SPECS[name]
            inputs, labels = data[name]["train"]
            backbone = DigitsBackbone(settings.hidden, settings.features, norm=settings.norm)
            backbone.load_state_dict(pretrained.state_dict())
            head = nn.Linear(settings.features, task.num_classes)
            if settings.probe_epochs:
                with torch.no_grad():
                    features = pretrained(inputs)
                _train(list(head.parameters()), head, features, labels, settings.probe_epochs,
                       settings.finetune_lr * 10, settings.batch_size, generator)
            _train(
                [*backbone.parameters(), *head.parameters()],
                lambda x, b=backbone, h=head: h(b(x)),
                inputs,
                labels,
                settings.finetune_epochs,
                settings.finetune_lr,
                settings.batch_size,
                generator,
            )
            experts[name] = backbone.eval()
            heads[name] = head.eval()
    return pretrained, experts, heads


# ---------------------------------------------------------------------- build / cache


def _manifest(settings: DigitsZooSettings) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "settings": settings.to_json(),
        "tasks": {
            name: {"domain": TASK_SPECS[name].domain, "label": TASK_SPECS[name].label,
                   "num_classes": TASK_SPECS[name].num_classes}
            for name in settings.tasks
        },
        "files": {
            "pretrained": "pretrained.safetensors",
            "experts": {name: f"expert_{name}.safetensors" for name in settings.tasks},
            "heads": "heads.safetensors",
        },
    }


def _save(directory: Path, settings: DigitsZooSettings, pretrained, experts, heads) -> None:
    metadata = {"format": FORMAT, "seed": str(settings.seed)}
    save_safetensors(pretrained.state_dict(), directory / "pretrained.safetensors", metadata=metadata)
    for name, backbone in experts.items():
        save_safetensors(backbone.state_dict(), directory / f"expert_{name}.safetensors", metadata=metadata)
    head_tensors = {f"{name}.{key}": t for name, head in heads.items() for key, t in head.state_dict().items()}
    save_safetensors(head_tensors, directory / "heads.safetensors", metadata=metadata)
    # the manifest is written last: a folder without one is never taken for a finished zoo
    write_text(directory / "manifest.json", json.dumps(_manifest(settings), indent=1))


def _load(directory: Path, settings: DigitsZooSettings):
    pretrained = DigitsBackbone(settings.hidden, settings.features, norm=settings.norm)
    pretrained.load_state_dict(load_file(str(directory / "pretrained.safetensors")))
    experts, heads = {}, {}
    head_tensors = load_file(str(directory / "heads.safetensors"))
    for name in settings.tasks:
        backbone = DigitsBackbone(settings.hidden, settings.features, norm=settings.norm)
        backbone.load_state_dict(load_file(str(directory / f"expert_{name}.safetensors")))
        experts[name] = backbone.eval()
        head = nn.Linear(settings.features, TASK_SPECS[name].num_classes)
        head.load_state_dict({key: head_tensors[f"{name}.{key}"] for key in ("weight", "bias")})
        heads[name] = head.eval()
    return pretrained.eval(), experts, heads


def _cached(directory: Path, settings: DigitsZooSettings) -> bool:
    """Whether ``directory`` holds a complete zoo built with exactly these settings."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest != json.loads(json.dumps(_manifest(settings))):
        return False
    files = ["pretrained.safetensors", "heads.safetensors", *(f"expert_{n}.safetensors" for n in settings.tasks)]
    return all((directory / f).is_file() for f in files)


def build_digits_zoo(
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    tasks: Sequence[str] | None = None,
    rebuild: bool = False,
    cache: bool = True,
    **overrides,
) -> DigitsZoo:
    """Build (or load from cache) the digits zoo.

    ``cache_dir`` defaults to :func:`default_cache_dir`. A cached zoo is reused only when its
    manifest matches ``seed``, ``tasks`` and every other setting (``overrides`` are fields of
    :class:`DigitsZooSettings`); otherwise it is rebuilt and replaced atomically. With
    ``cache=False`` nothing is read or written. Builds in a few seconds on 2 CPU cores.
    """
    names = tuple(tasks) if tasks is not None else TASKS
    unknown = [n for n in names if n not in TASK_SPECS]
    if unknown or not names:
        raise ValueError(f"unknown digits tasks {unknown}; choose from {list(TASK_SPECS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"digits tasks must be unique, got {list(names)}")
    settings = DigitsZooSettings(seed=int(seed), tasks=names, **overrides)
    splits = _load_splits(settings)
    data = {
        name: {split: _task_data(TASK_SPECS[name], splits[split], settings.seed, split) for split in splits}
        for name in names
    }
    directory = None
    if cache:
        directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if directory is not None and not rebuild and _cached(directory, settings):
        pretrained, experts, heads = _load(directory, settings)
    else:
        pretrained, experts, heads = _train_models(settings, splits, data)
        if directory is not None:
            with atomic_directory(directory) as staging:
                _save(staging, settings, pretrained, experts, heads)
    return DigitsZoo(
        settings=settings,
        pretrained=pretrained,
        experts=experts,
        heads=heads,
        tasks={name: TASK_SPECS[name] for name in names},
        calibration={name: data[name]["calibration"][0] for name in names},
        test_inputs={name: data[name]["test"][0] for name in names},
        test_labels={name: data[name]["test"][1] for name in names},
        train_inputs={name: data[name]["train"][0] for name in names},
        train_labels={name: data[name]["train"][1] for name in names},
        cache_dir=directory,
    )
