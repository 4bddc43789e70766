"""The ``hf_causal_lm`` kind (adamerge.app.problems.causal_lm) over conftest's tiny Llama with a
word tokenizer: prompts and responses become loss-masked rows, and its exporter through the files
it writes (the merged model and tokenizer; streamed, the shards with config and generation config)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from adamerge import MergedModel, TaskVectors  # noqa: E402
from adamerge.app.config import load_recipe  # noqa: E402
from adamerge.app.problems import build_problem  # noqa: E402
from adamerge.io.checkpoints import open_weights  # noqa: E402
from adamerge.io.shards import ShardWriter  # noqa: E402
from adamerge.tasks.hf import CausalLMTask  # noqa: E402
from fixtures.families import perturbed  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tiny_llama, lora_words):
    """``base`` (a tiny Llama with a word tokenizer) and one expert ``e0``."""
    root = tmp_path_factory.mktemp("causal_lm")
    base = tiny_llama()
    base.generation_config.max_new_tokens = 7
    base.save_pretrained(root / "base")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *lora_words]
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(root / "base")
    perturbed(base, seed=3, scale=0.05).save_pretrained(root / "e0")
    return root


def problem_of(lm_dir, streamed=False, **task):
    recipe = load_recipe({"problem": {"kind": "hf_causal_lm", "pretrained": str(lm_dir / "base"), "max_length": 16,
                                      "tasks": {"qa": {"expert": str(lm_dir / "e0"), **task}}}})
    return build_problem(recipe.problem, streamed=streamed)


def test_prompts_and_responses_become_loss_masked_rows(lm_dir, tmp_path):
    (tmp_path / "qa.jsonl").write_text('{"q": "alpha beta", "a": "gamma"}\n{"q": "delta", "a": "echo fox"}\n')
    problem = problem_of(lm_dir, text="q", response="a", calibration={"path": str(tmp_path / "qa.jsonl")})
    assert isinstance(problem.tasks["qa"], CausalLMTask) and problem.include is None
    assert problem.description == {"kind": "hf_causal_lm", "base": str(lm_dir / "base"), "experts": {"qa": str(lm_dir / "e0")}}
    batch = problem.collate([problem.calibration["qa"][i] for i in range(2)])
    assert batch["loss_mask"].sum(dim=1).tolist() == [1, 2]
    merged = MergedModel(problem.pretrained, TaskVectors.from_models(problem.pretrained, problem.experts), "task")
    output = problem.tasks["qa"](merged, merged.merged_parameters(), batch)
    assert output.logits.shape == (3, 15) and output.sample_rows.tolist() == [1, 2]
    with pytest.raises(ValueError, match="problem kind 'hf_causal_lm' needs experts"):
        build_problem(load_recipe({"problem": {"kind": "hf_causal_lm", "pretrained": str(lm_dir / "base"),
                                               "tasks": {"qa": {"text": "q"}}}}).problem)


def test_the_export_is_a_folder_from_pretrained_opens_with_its_tokenizer(lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    problem = problem_of(lm_dir)
    merged = problem.pretrained
    with torch.no_grad():
        merged.model.norm.weight.add_(0.5)
    problem.exporter.export(merged, tmp_path, 10**9)
    written = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(written.state_dict()[k], v) for k, v in merged.state_dict().items())
    assert AutoTokenizer.from_pretrained(tmp_path).tokenize("alpha juliet") == ["alpha", "juliet"]


def test_a_streamed_export_is_its_shards_with_config_generation_config_and_tokenizer(lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM, GenerationConfig

    problem = problem_of(lm_dir, streamed=True)
    assert next(problem.pretrained.parameters()).device.type == "meta"
    weights = dict(problem.pretrained_weights)
    keys = sorted(weights)
    shards = tmp_path / "shards"
    shards.mkdir()
    writer = ShardWriter(shards, 2)
    writer.write(0, {k: weights[k] for k in keys[:5]})
    writer.write(1, {k: weights[k] for k in keys[5:]})
    problem.exporter.export_streamed(shards, tmp_path / "merged")
    folder = tmp_path / "merged"
    assert GenerationConfig.from_pretrained(folder).max_new_tokens == 7
    assert (folder / "tokenizer_config.json").is_file() and (folder / "model.safetensors.index.json").is_file()
    written = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    base = open_weights(str(lm_dir / "base"))
    assert all(torch.equal(written[k], base[k]) for k in base)


def test_problem_dtype_loads_the_model_in_it_and_reads_the_experts_in_it(lm_dir, tmp_path):
    """``problem.dtype: bfloat16`` over float32 checkpoints, and bf16 experts over a bf16 base: both merge."""
    problem = problem_of(lm_dir)
    assert next(problem.pretrained.parameters()).dtype == torch.float32  # auto: as saved
    recipe = load_recipe({"problem": {"kind": "hf_causal_lm", "pretrained": str(lm_dir / "base"), "dtype": "bfloat16",
                                      "tasks": {"qa": {"expert": str(lm_dir / "e0")}}}})
    halved = build_problem(recipe.problem)
    assert {p.dtype for p in halved.pretrained.parameters()} == {torch.bfloat16}
    tv = TaskVectors.from_models(halved.pretrained, halved.experts)  # float32 expert files, read in bf16
    base, expert = dict(open_weights(str(lm_dir / "base"))), dict(open_weights(str(lm_dir / "e0")))
    key = tv.keys[0]
    assert torch.equal(tv[key][0], expert[key].bfloat16().float() - base[key].bfloat16().float())
    for name in ("base", "e0"):  # a bf16 zoo over a bf16 base, the checkpoints' own dtype
        transformers.AutoModelForCausalLM.from_pretrained(lm_dir / name, dtype=torch.bfloat16).save_pretrained(tmp_path / name)
    transformers.AutoTokenizer.from_pretrained(lm_dir / "base").save_pretrained(tmp_path / "base")
    native = build_problem(load_recipe({"problem": {"kind": "hf_causal_lm", "pretrained": str(tmp_path / "base"),
                                                    "tasks": {"qa": {"expert": str(tmp_path / "e0")}}}}).problem)
    assert next(native.pretrained.parameters()).dtype == torch.bfloat16
    assert MergedModel(native.pretrained, TaskVectors.from_models(native.pretrained, native.experts), "task").merged_parameters()
