"""What the benchmarks share: the MiniLM text zoo and a tiny BERT zoo as merge problems, fixed
per-step batches, the adamerge step, the plain (unmerged) step, timing and memory readings.

The MiniLM zoo is read from ``--zoo`` (``benchmarks.zoos.text`` builds it) and its data from
``--data`` (``<task>/{train,test}.jsonl``); :func:`minilm_available` says whether both are there
so scripts can skip cleanly without them.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the scripts run as `python benchmarks/<name>.py` and import benchmarks.zoos
    sys.path.append(str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no profiler start/stop banners

import torch  # noqa: E402
from torch import nn  # noqa: E402

from adamerge.learning.data import TaskBatches  # noqa: E402
from adamerge.learning.learner import CoefficientLearner  # noqa: E402
from adamerge.core.merged import MergedModel  # noqa: E402
from adamerge.objectives.entropy import Entropy, prediction_entropy  # noqa: E402
from adamerge.app.problems.problem import MergeProblem  # noqa: E402
from adamerge.core.task_vectors import TaskVectors  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("ADAMERGE_TEXT_DATA", "/work/shared/data/text"))
DEFAULT_ZOO = Path(os.environ.get("ADAMERGE_CACHE", "~/.cache/adamerge")).expanduser() / "zoo" / "minilm-text"
MINILM_TASKS = ("agnews", "emotion", "sms_spam", "sst2", "subj", "trec")


def add_common_arguments(parser) -> None:
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the text tasks' data root")
    parser.add_argument("--zoo", type=Path, default=DEFAULT_ZOO, help="the MiniLM zoo (benchmarks.zoos.text)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (fixed for every measurement)")
    parser.add_argument("--batch", type=int, default=16, help="inputs per task per step")


def minilm_available(data: Path, zoo: Path) -> bool:
    return all((data / t / "test.jsonl").exists() and (zoo / t / "config.json").exists() for t in MINILM_TASKS)


def minilm_recipe(data: Path, zoo: Path, *overrides: str):
    """The built-in layer-wise AdaMerging recipe on the MiniLM zoo (calibration: 512 test rows per task)."""
    from adamerge.app.config import resolve_recipe
    from adamerge.app.config import load_recipe

    return load_recipe(
        resolve_recipe("text/adamerging_layerwise"),
        [f"problem.options.data_root={data}", f"problem.options.zoo_dir={zoo}", *overrides],
    )


def minilm_problem(data: Path, zoo: Path, experts: int | None = None) -> MergeProblem:
    """The MiniLM zoo's six tasks; with ``experts`` = K, K experts and K tasks, the six repeated
    in order (``sst2#1`` is a second copy of ``sst2``: the same expert and head, its own stream of rows)."""
    from adamerge.app.problems import build_problem

    problem = build_problem(minilm_recipe(data, zoo).problem)
    if experts is None:
        return problem
    names = [MINILM_TASKS[k % 6] + (f"#{k // 6}" if k >= 6 else "") for k in range(experts)]
    source = [n.split("#")[0] for n in names]
    problem.experts = {n: problem.experts[s] for n, s in zip(names, source)}
    problem.tasks = {n: copy.deepcopy(problem.tasks[s]) for n, s in zip(names, source)}
    problem.calibration = {n: problem.calibration[s] for n, s in zip(names, source)}
    problem.evaluation = {n: problem.evaluation[s] for n, s in zip(names, source)}
    return problem


def tiny_problem(experts: int = 6, rows: int = 64, length: int = 32) -> MergeProblem:
    """A tiny BERT sequence-classification zoo in memory (2 layers, hidden 64): per-step cost
    is dominated by per-tensor and per-op overhead, the opposite of MiniLM."""
    from transformers import BertConfig, BertForSequenceClassification

    from adamerge.tasks.hf import sequence_classification_tasks

    config = BertConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    base = BertForSequenceClassification(config).eval()
    weights, data = {}, {}
    for k in range(experts):
        generator = torch.Generator().manual_seed(100 + k)
        state = {n: t + 0.02 * torch.randn(t.shape, generator=generator) for n, t in base.state_dict().items()}
        labels = 2 + k % 3
        state["classifier.weight"] = torch.randn(labels, 64, generator=generator) * 0.2
        state["classifier.bias"] = torch.zeros(labels)
        weights[f"task{k}"] = state
        ids = torch.randint(5, 1000, (rows, length), generator=generator)
        data[f"task{k}"] = [
            {"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long),
             "token_type_ids": torch.zeros(length, dtype=torch.long)}
            for i in range(rows)
        ]
    tasks, scope = sequence_classification_tasks(base, weights)
    return MergeProblem(pretrained=base, experts=weights, tasks=tasks, calibration=data, include=[scope])


def step_batches(problem: MergeProblem, steps: int, batch_size: int, seed: int = 0) -> list[dict[str, dict]]:
    """``{task: batch}`` for steps ``0 … steps-1`` of seeded calibration streams (one seed per task,
    so repeated tasks read other rows), collated in advance."""
    def collate_for(task):
        return problem.collate[task] if isinstance(problem.collate, Mapping) else problem.collate

    streams = {
        n: TaskBatches(n, d, batch_size, collate_for(n), seed + index)
        for index, (n, d) in enumerate(problem.calibration.items())
    }
    return [{n: s.batch(step) for n, s in streams.items()} for step in range(steps)]


def task_vectors(problem: MergeProblem, dtype: str = "float32") -> TaskVectors:
    return TaskVectors.from_models(problem.pretrained, problem.experts, include=problem.include,
                                   exclude=problem.exclude, dtype=dtype)


def adamerge_learner(problem: MergeProblem, vectors: TaskVectors, per_task_backward: bool = False,
                     lr: float = 1e-3, copy_backbone: bool = True) -> CoefficientLearner:
    """Layer-wise AdaMerging as the built-in recipe sets it up (init 0.3, entropy, Adam). The
    merged model freezes its backbone in place: it gets a copy unless ``copy_backbone`` is off."""
    backbone = copy.deepcopy(problem.pretrained) if copy_backbone else problem.pretrained
    merged = MergedModel(backbone, vectors, "layer", init=0.3)
    return CoefficientLearner(merged, problem.tasks, Entropy(), lr=lr, per_task_backward=per_task_backward)


class AdamergeStep:
    """One training step as Lightning's automatic optimisation runs it (its bookkeeping aside):
    the learner's loss, backward, Adam step, constraint projection."""

    def __init__(self, learner: CoefficientLearner):
        self.learner = learner
        self.optimizer = learner.configure_optimizers()

    def __call__(self, batch: Mapping[str, dict]) -> float:
        self.optimizer.zero_grad()
        loss, _ = self.learner.step_loss(batch)
        loss.backward()
        self.optimizer.step()
        self.learner.merged.coefficients.project_()
        return float(loss.detach())


class PlainStep:
    """The floor: forward + backward of the unmerged backbone (its weights requiring grad) with
    each task's own head, on the same batches and loss, as ordinary modules (no merge, no
    ``functional_call``). ``per_task``: one backward per task (one task's activations at a time)."""

    def __init__(self, problem: MergeProblem, per_task: bool = False):
        self.model = copy.deepcopy(problem.pretrained).eval()
        self.encoder = self.model.base_model.requires_grad_(True)
        self.per_task = per_task
        self.heads = {}
        for name, task in problem.tasks.items():
            weights = {k.split(".", 1)[1]: v for k, v in task.head.as_dict().items()}
            head = nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
            head.load_state_dict(weights)
            self.heads[name] = head.requires_grad_(False)
        self.inputs = ("input_ids", "attention_mask", "token_type_ids")

    def task_loss(self, name: str, batch: Mapping) -> torch.Tensor:
        pooled = self.encoder(**{k: batch[k] for k in self.inputs if k in batch}).pooler_output
        return prediction_entropy(self.heads[name](pooled)).mean()

    def loss(self, batch: Mapping[str, dict]) -> torch.Tensor:
        return sum(self.task_loss(name, task_batch) for name, task_batch in batch.items())

    def __call__(self, batch: Mapping[str, dict]) -> float:
        for parameter in self.encoder.parameters():
            parameter.grad = None
        if not self.per_task:
            loss = self.loss(batch)
            loss.backward()
            return float(loss.detach())
        total = 0.0
        for name, task_batch in batch.items():
            loss = self.task_loss(name, task_batch)
            loss.backward()
            total += float(loss.detach())
        return total


def timed(fn: Callable, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def median(values) -> float:
    return statistics.median(values)


def in_fresh_process(script: str, *args: str) -> dict:
    """Run ``script --child args...`` in a new interpreter (memory measured from a clean process)
    and return the JSON its last output line holds."""
    done = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (``VmRSS``) or its peak since the last reset (``VmHWM``), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> float:
    """Hand the C heap's freed pages back (``malloc_trim``), reset the peak-RSS mark (``VmHWM``)
    to the current RSS and return it in MiB: the baseline a peak is measured from. Without the
    trim, memory freed before the mark but still resident would sit in the baseline and be handed
    back later (the streamed run trims after each stage), understating the growth (by ~25 MiB
    after the streaming benchmark's warm-up)."""
    from adamerge.core.skeleton import return_freed_memory

    return_freed_memory()
    Path("/proc/self/clear_refs").write_text("5")
    return rss_mb()


def load_average() -> float:
    return os.getloadavg()[0]


# ---------------------------------------------------------------------- recipe runs (text and LM benchmarks)


def run_recipe(job: str, recipe: str, settings: list[str], target: Path):
    """Run a built-in recipe (``adamerge <job>``) into ``target``; its wall time and time to the
    merged model go to ``target/timing.json``. Returns the run's result."""
    import json

    from adamerge.app import runner
    from adamerge.app.config import load_recipe, resolve_recipe
    from adamerge.io.checkpoints import write_text

    started = time.perf_counter()
    result = getattr(runner, job)(load_recipe(resolve_recipe(recipe), [f"output_dir={target}", *settings]))
    seconds = time.perf_counter() - started
    write_text(target / "timing.json", json.dumps({"seconds": seconds, "seconds_to_merge": result.seconds_to_merge}))
    return result


def read_timing(target: Path) -> dict:
    """``{seconds, seconds_to_merge}`` of an earlier :func:`run_recipe` into ``target`` (empty if none)."""
    import json

    timing = target / "timing.json"
    return json.loads(timing.read_text()) if timing.exists() else {}


def normalised_accuracy(per_task: Mapping[str, Mapping], experts: Mapping[str, Mapping]) -> float | None:
    """Each task's accuracy divided by its expert's, averaged over tasks (as the 2025 papers report)."""
    ratios = [r["accuracy"] / experts[t]["accuracy"] for t, r in per_task.items()
              if t in experts and r.get("accuracy") is not None and experts[t].get("accuracy")]
    return sum(ratios) / len(ratios) if ratios else None
