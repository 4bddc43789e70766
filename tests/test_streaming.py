"""Streamed progressive learning end to end (learning/progressive over core/skeleton and io/shards,
each tested on its own in test_skeleton.py and test_shards.py): on tiny BERT, GPT-2 and Llama
models saved as (sharded) safetensors, the streamed run learns the same coefficients and writes the
same merged weights as the in-memory run; only one stage's tensors are ever resident; the sharded
output opens with ``from_pretrained``; resume mid-way is exact; features in memory-mapped files
change nothing; the ``progressive.stream`` recipes."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("transformers")

from adamerge.tasks import blocks as B  # noqa: E402
from adamerge.io.checkpoints import open_weights  # noqa: E402
from adamerge.core.merged import module_with_tensors  # noqa: E402
from adamerge.learning.progressive import ProgressiveDistiller  # noqa: E402
from adamerge.io.shards import INDEX, ShardWriter  # noqa: E402
from adamerge.core import skeleton as skeleton_module  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def distill(coefficients_for):
    """``distill(pretrained, experts, tasks, batches, keys, granularity="chunk", **options)``: a
    3-epoch progressive run from coefficients at 0.3 (two chunks per tensor when chunk-wise);
    returns (distiller, result)."""

    def run(pretrained, experts, tasks, batches, keys, granularity="chunk", **options):
        chunks = {"chunks": 2} if granularity == "chunk" else {}
        coefficients = coefficients_for(granularity, experts, pretrained, keys, **chunks)
        distiller = ProgressiveDistiller(pretrained, experts, tasks, batches, coefficients, keys=keys,
                                         epochs=3, lr=0.05, progress=False, **options)
        return distiller, distiller.run()

    return run


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_streamed_run_equals_the_in_memory_run(skeleton_of, saved, distill, kind, tmp_path):
    pretrained, experts, tasks, batches, keys = saved(tmp_path, kind)
    _, in_memory = distill(copy.deepcopy(pretrained), experts, tasks, batches, keys)
    skeleton = skeleton_of(pretrained)
    assert all(p.is_meta for p in skeleton.parameters())
    writer = ShardWriter(tmp_path / "out", total=4)  # embeddings, two blocks, head
    _, streamed = distill(skeleton, experts, tasks, batches, keys, weights=open_weights(str(tmp_path / "base")), writer=writer)
    torch.testing.assert_close(streamed.coefficients.state_dict(), in_memory.coefficients.state_dict(), rtol=1e-5, atol=1e-6)
    writer.finish()
    written = dict(open_weights(str(tmp_path / "out")))
    expected = module_with_tensors(pretrained, in_memory.merged).state_dict()
    aliases = {a for a in expected if a not in written}
    assert all(a.endswith("lm_head.weight") for a in aliases), aliases  # only a tied head is left to its tie
    for key, tensor in written.items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert all(p.is_meta for p in skeleton.parameters())  # nothing is left resident after the run
    pretrained.config.save_pretrained(tmp_path / "out")
    reloaded = type(pretrained).from_pretrained(tmp_path / "out")
    for key, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_only_the_current_stages_tensors_are_ever_resident(skeleton_of, saved, distill, tmp_path, monkeypatch):
    pretrained, experts, tasks, batches, keys = saved(tmp_path, "llama")
    skeleton = skeleton_of(pretrained)
    prefix = B.find_blocks(skeleton)
    seen = []
    original = ProgressiveDistiller._stage_merge

    def spy(self, stage):  # stand-ins (one expanded zero) take no memory
        real = {n for n, p in skeleton.named_parameters() if not p.is_meta and any(p.stride())}
        seen.append((stage, real))
        return original(self, stage)

    monkeypatch.setattr(ProgressiveDistiller, "_stage_merge", spy)
    distill(skeleton, experts, tasks, batches, keys, weights=open_weights(str(tmp_path / "base")))
    assert [stage.name for stage, _ in seen] == ["embeddings", f"{prefix}.0", f"{prefix}.1", "head"]
    for stage, real in seen:
        assert real == set(stage.needs), stage.name
    assert seen[1][1] and all(k.startswith(f"{prefix}.0.") for k in seen[1][1])
    assert seen[-1][1] == {"model.norm.weight", "model.embed_tokens.weight"}  # the tied head reads the embedding


def test_every_stage_hands_its_freed_memory_back_once_its_tensors_are_dropped(skeleton_of, saved, distill, tmp_path, monkeypatch):
    pretrained, experts, tasks, batches, keys = saved(tmp_path, "llama")
    skeleton = skeleton_of(pretrained)
    resident_at_trim = []
    monkeypatch.setattr(skeleton_module, "return_freed_memory",
                        lambda: resident_at_trim.append([n for n, p in skeleton.named_parameters() if not p.is_meta]))
    distiller, _ = distill(skeleton, experts, tasks, batches, keys, weights=open_weights(str(tmp_path / "base")))
    assert len(resident_at_trim) == 1 + len(distiller.stages)  # the stage-finding probe, then each stage
    assert resident_at_trim == [[]] * len(resident_at_trim)


def test_streamed_resume_mid_way_is_exact(skeleton_of, coefficients_for, saved, distill, crash, tmp_path):
    pretrained, experts, tasks, batches, keys = saved(tmp_path, "gpt2")
    weights = open_weights(str(tmp_path / "base"))
    reference, result = distill(skeleton_of(pretrained), experts, tasks, batches, keys, weights=weights,
                                writer=ShardWriter(tmp_path / "ref", 4))

    first = ProgressiveDistiller(skeleton_of(pretrained), experts, tasks, batches,
                                 coefficients_for("chunk", experts, pretrained, keys, chunks=2), keys=keys, epochs=3, lr=0.05,
                                 progress=False, weights=weights, writer=ShardWriter(tmp_path / "run", 4),
                                 checkpoint=tmp_path / "progress.safetensors")
    crash.arm(first, "_save_checkpoint", after=2)  # dies once two stages are written and saved
    with pytest.raises(crash.error):
        first.run()
    crash.disarm()
    assert sorted(p.name for p in (tmp_path / "run").glob("*.safetensors")) == ["model-00001-of-00004.safetensors",
                                                                                "model-00002-of-00004.safetensors"]
    with pytest.raises(FileNotFoundError, match="model-00003-of-00004"):
        ShardWriter(tmp_path / "run", 4).finish()  # an unfinished run writes no index
    _, resumed = distill(skeleton_of(pretrained), experts, tasks, batches, keys, weights=weights,
                         writer=(writer := ShardWriter(tmp_path / "run", 4)), checkpoint=tmp_path / "progress.safetensors")
    for name, tensor in result.coefficients.state_dict().items():
        assert torch.equal(tensor, resumed.coefficients.state_dict()[name]), name
    writer.finish()
    ShardWriter(tmp_path / "ref", 4).finish()
    ours, theirs = dict(open_weights(str(tmp_path / "run"))), dict(open_weights(str(tmp_path / "ref")))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_features_in_memory_mapped_files_change_nothing(saved, distill, tmp_path):
    pretrained, experts, tasks, batches, keys = saved(tmp_path, "bert")
    _, in_memory = distill(copy.deepcopy(pretrained), experts, tasks, batches, keys)
    _, on_disk = distill(copy.deepcopy(pretrained), experts, tasks, batches, keys, features_dir=tmp_path / "features")
    for name, tensor in in_memory.coefficients.state_dict().items():
        assert torch.equal(tensor, on_disk.coefficients.state_dict()[name]), name
    assert len(list((tmp_path / "features").glob("*.bin"))) == 2 * sum(len(b) for b in batches.values())  # one stage's


def test_element_wise_coefficients_are_refused_when_streaming(skeleton_of, saved, distill, tmp_path):
    pretrained, experts, tasks, batches, keys = saved(tmp_path, "llama")
    with pytest.raises(ValueError, match="element-wise ones are as large as the task vectors"):
        distill(skeleton_of(pretrained), experts, tasks, batches, keys, granularity="element",
                weights=open_weights(str(tmp_path / "base")))


# ---------------------------------------------------------------------- the recipe: progressive.stream


def _same_runs(streamed_dir, in_memory_dir, names_in_memory=lambda key: key):
    from adamerge.core.coefficients import MergeCoefficients

    a = MergeCoefficients.load(streamed_dir / "coefficients.safetensors")
    b = MergeCoefficients.load(in_memory_dir / "coefficients.safetensors")
    torch.testing.assert_close(a(), b(), rtol=1e-5, atol=1e-6)
    streamed = dict(open_weights(str(streamed_dir / "merged")))
    in_memory = dict(open_weights(str(in_memory_dir / "merged")))
    assert (streamed_dir / "merged" / INDEX).exists() and len(list((streamed_dir / "merged").glob("model-*.safetensors"))) == 4
    assert set(streamed) == {names_in_memory(k) for k in in_memory}
    for key, tensor in in_memory.items():
        torch.testing.assert_close(streamed[names_in_memory(key)], tensor, rtol=1e-5, atol=1e-6, msg=key)
    one, other = json.loads((streamed_dir / "eval.json").read_text()), json.loads((in_memory_dir / "eval.json").read_text())
    assert one.keys() == other.keys()
    for task in one:
        assert one[task]["accuracy"] == pytest.approx(other[task]["accuracy"]), task


def test_streamed_causal_lm_recipe_equals_the_in_memory_one_and_opens_with_from_pretrained(causal_lm_zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    from adamerge.app import runner
    from adamerge.app.config import load_recipe

    def recipe(name, **progressive):
        return load_recipe({
            "name": name, "output_dir": str(tmp_path / name),
            "problem": causal_lm_zoo,
            "coefficients": {"granularity": "chunk", "chunks": 2, "init": 0.3}, "objectives": [],
            "progressive": {"epochs": 2, "samples_per_task": 4, **progressive},
            "optimizer": {"lr": 0.05}, "trainer": {"batch_size": 2, "progress_bar": False}, "evaluation": {"batch_size": 4},
        })

    streamed = runner.fit(recipe("streamed", stream=True, features="disk")).run_dir
    in_memory = runner.fit(recipe("in_memory")).run_dir
    _same_runs(streamed, in_memory)
    reloaded = AutoModelForCausalLM.from_pretrained(streamed / "merged")
    expected = dict(open_weights(str(in_memory / "merged")))
    for key, tensor in expected.items():
        torch.testing.assert_close(reloaded.state_dict()[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    assert (streamed / "merged" / "tokenizer_config.json").exists() and (streamed / "merged" / "README.md").exists()


def test_streamed_text_classifier_recipe_writes_the_merged_encoder_and_heads(zoo, recipe_dict, tmp_path):
    from adamerge.app import runner
    from adamerge.app.config import load_recipe

    coefficients = {"granularity": "layer", "init": 0.3}

    def run(name, **progressive):
        return runner.fit(load_recipe(recipe_dict(zoo, tmp_path, name=name, coefficients=coefficients, objectives=[],
                                                  trainer={"batch_size": 4, "progress_bar": False},
                                                  progressive={"epochs": 2, "samples_per_task": 8, **progressive}))).run_dir

    streamed, in_memory = run("streamed", stream=True), run("in_memory")
    _same_runs(streamed, in_memory)  # the encoder's names, without `bert.`, in both
    assert sorted(p.name for p in (streamed / "merged" / "heads").iterdir()) == ["a.safetensors", "b.safetensors"]


def test_streaming_refusals_cost_no_model_load(tmp_path):
    from adamerge.app.config import RecipeError, load_recipe
    from adamerge.app.problems import build_problem

    base = {"problem": {"kind": "digits"}, "objectives": [], "coefficients": {"granularity": "element"}}
    with pytest.raises(RecipeError, match="element-wise ones are as large as the task vectors"):
        load_recipe({**base, "progressive": {"stream": True}})
    with pytest.raises(RecipeError, match="progressive.features is 'ram'"):
        load_recipe({**base, "progressive": {"features": "ram"}})
    with pytest.raises(ValueError, match="problem kind 'digits' cannot be streamed"):
        build_problem(load_recipe({"problem": {"kind": "digits"}}).problem, streamed=True)
