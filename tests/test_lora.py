"""Experts as PEFT LoRA adapters: τ is ΔW = s·B·A, checked against peft's own merge_and_unload.

peft writes the adapters (the ``write_adapter`` fixture) and merges them; adamerge reads the folders itself.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import adamerge as am  # noqa: E402
from adamerge import TaskVectors  # noqa: E402
from adamerge.io.checkpoints import UnreadableInput, open_weights  # noqa: E402
from adamerge.io.lora import LoraAdapter, LoraExpert, open_adapter  # noqa: E402


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=20, n_embd=16, n_layer=2, n_head=2, n_positions=32)).eval()


def factors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def assert_tau_is_peft_merge(base, merged, tv, expert=0):
    """τ equals peft's merged weights minus the base's, tensor by tensor (float32 rounding of
    θ_0 + ΔW aside), and tensors the adapter does not touch have τ exactly 0."""
    state = base.state_dict()
    for key in tv.keys:
        expected = merged[key].float() - state[key].float()
        if torch.equal(merged[key], state[key]):
            assert torch.equal(tv[key][expert], torch.zeros_like(tv[key][expert])), key
        else:
            torch.testing.assert_close(tv[key][expert], expected, rtol=0, atol=2e-6, msg=key)


CONFIGS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "o_proj"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj"],
                     rank_pattern={"layers.1.self_attn.q_proj": 2, "up_proj": 3},
                     alpha_pattern={"layers.0.self_attn.k_proj": 5}),
    "modules_to_save": dict(r=2, lora_alpha=4, target_modules=["v_proj"], modules_to_save=["lm_head"]),
    "embedding": dict(r=3, lora_alpha=3, target_modules=["embed_tokens", "gate_proj"]),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_lora_task_vector_is_peft_merge_minus_base(tiny_llama, write_adapter, tmp_path, case):
    base = tiny_llama()
    merged = write_adapter(base, tmp_path / "a", **CONFIGS[case])
    tv = TaskVectors.from_models(base, {"a": str(tmp_path / "a")})
    assert_tau_is_peft_merge(base, merged, tv)
    # the expert itself, θ_0 + ΔW, is peft's merged model bit for bit
    expert = open_adapter(tmp_path / "a", base.state_dict())
    for key in base.state_dict():
        assert torch.equal(expert[key], merged[key]), key


def test_scaling_is_alpha_over_rank_with_patterns_by_hand(tiny_llama, write_adapter, tmp_path):
    base = tiny_llama()
    write_adapter(base, tmp_path / "a", **CONFIGS["patterns"])
    saved = factors(tmp_path / "a")
    tv = TaskVectors.from_models(base, {"a": str(tmp_path / "a")})
    expected_scaling = {  # (module, r, α): the first pattern that matches a dotted tail wins
        "model.layers.1.self_attn.q_proj": (2, 8), "model.layers.0.self_attn.q_proj": (4, 8),
        "model.layers.0.self_attn.k_proj": (4, 5), "model.layers.1.mlp.up_proj": (3, 8),
    }
    for module, (rank, alpha) in expected_scaling.items():
        a, b = saved[f"base_model.model.{module}.lora_A.weight"], saved[f"base_model.model.{module}.lora_B.weight"]
        assert a.shape[0] == rank
        torch.testing.assert_close(tv[f"{module}.weight"][0], (alpha / rank) * (b @ a), rtol=1e-5, atol=1e-7)


def test_rslora_scales_by_alpha_over_root_rank(tiny_llama, write_adapter, tmp_path):
    base = tiny_llama()
    write_adapter(base, tmp_path / "a", **CONFIGS["rslora"])
    saved = factors(tmp_path / "a")
    module = "model.layers.0.self_attn.o_proj"
    a, b = saved[f"base_model.model.{module}.lora_A.weight"], saved[f"base_model.model.{module}.lora_B.weight"]
    tv = TaskVectors.from_models(base, {"a": str(tmp_path / "a")})
    torch.testing.assert_close(tv[f"{module}.weight"][0], (6 / math.sqrt(4)) * (b @ a), rtol=1e-5, atol=1e-7)


def test_gpt2_conv1d_fan_in_fan_out_is_transposed(write_adapter, tmp_path):
    base = tiny_gpt2()
    merged = write_adapter(base, tmp_path / "a", r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    tv = TaskVectors.from_models(base, {"a": str(tmp_path / "a")})
    assert_tau_is_peft_merge(base, merged, tv)
    assert tv["transformer.h.0.attn.c_attn.weight"][0].shape == (16, 48)  # Conv1D: [in, out]
    assert tv["transformer.h.0.attn.c_attn.weight"][0].abs().sum() > 0


def test_pickled_adapter_is_read_with_weights_only(tiny_llama, write_adapter, tmp_path):
    base = tiny_llama()
    merged = write_adapter(base, tmp_path / "a", safe=False, **CONFIGS["plain"])
    assert (tmp_path / "a" / "adapter_model.bin").is_file() and not (tmp_path / "a" / "adapter_model.safetensors").exists()
    assert_tau_is_peft_merge(base, merged, TaskVectors.from_models(base, {"a": str(tmp_path / "a")}))


def test_membership_does_not_compute_delta_w(tiny_llama, write_adapter, tmp_path):
    write_adapter(tiny_llama(), tmp_path / "a", **CONFIGS["plain"])
    adapter = LoraAdapter(tmp_path / "a")
    adapter.tensors = {}  # computing any ΔW now fails
    assert "model.layers.0.self_attn.q_proj.weight" in adapter and "model.norm.weight" not in adapter


def test_bf16_base_keeps_delta_w_unrounded(tiny_llama, write_adapter, tmp_path):
    """τ of a LoRA expert is ΔW in float32, not (θ_0 + ΔW in bf16) − θ_0."""
    base = tiny_llama()
    write_adapter(base, tmp_path / "a", **CONFIGS["plain"])
    saved = factors(tmp_path / "a")
    bf16 = {k: v.to(torch.bfloat16) for k, v in base.state_dict().items()}
    tv = TaskVectors.from_models(bf16, {"a": str(tmp_path / "a")})
    module = "model.layers.1.mlp.down_proj"
    a, b = saved[f"base_model.model.{module}.lora_A.weight"], saved[f"base_model.model.{module}.lora_B.weight"]
    assert torch.equal(tv[f"{module}.weight"][0], (b @ a) * 2.0)
    assert open_adapter(tmp_path / "a", bf16)[f"{module}.weight"].dtype == torch.bfloat16


def test_task_arithmetic_of_two_adapters_is_base_plus_scaled_deltas(tiny_llama, write_adapter, tmp_path):
    base = tiny_llama()
    merged = {
        "a": write_adapter(base, tmp_path / "a", seed=1, **CONFIGS["plain"]),
        "b": write_adapter(base, tmp_path / "b", seed=2, **CONFIGS["patterns"]),
    }
    result = am.methods.task_arithmetic(base, {n: str(tmp_path / n) for n in ("a", "b")}, scaling=0.4)
    out = result.state_dict() if hasattr(result, "state_dict") else result
    for key, theta0 in base.state_dict().items():
        expected = theta0 + 0.4 * sum(merged[n][key] - theta0 for n in ("a", "b"))
        torch.testing.assert_close(out[key], expected, rtol=0, atol=2e-6, msg=key)


def test_layer_wise_learned_recipe_runs_with_adapter_experts(tiny_llama, write_adapter, lora_words, tmp_path):
    from transformers import BertTokenizer

    from adamerge.app import runner
    from adamerge.app.config import load_recipe

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *lora_words])}).save_pretrained(tmp_path / "base")
    write_adapter(base, tmp_path / "a", seed=1, **CONFIGS["plain"])
    write_adapter(base, tmp_path / "b", seed=2, **CONFIGS["modules_to_save"])
    rows = "\n".join(json.dumps({"q": " ".join(lora_words[i:i + 3]), "a": lora_words[(i + 5) % len(lora_words)]}) for i in range(6))
    (tmp_path / "rows.jsonl").write_text(rows)
    tasks = {n: {"expert": str(tmp_path / n), "text": "q", "response": "a", "calibration": {"path": str(tmp_path / "rows.jsonl")}}
             for n in ("a", "b")}
    recipe = load_recipe({
        "name": "lora", "output_dir": str(tmp_path / "run"), "objectives": [{"name": "entropy"}],
        "problem": {"kind": "hf_causal_lm", "pretrained": str(tmp_path / "base"), "max_length": 16, "tasks": tasks},
        "coefficients": {"granularity": "layer", "init": 0.3}, "optimizer": {"lr": 0.05},
        "evaluation": {"enabled": False}, "export": {"plot": False},
        "trainer": {"max_steps": 2, "batch_size": 2, "progress_bar": False, "accelerator": "cpu", "log_every_n_steps": 1},
    })
    result = runner.fit(recipe)
    learned = result.merged.coefficients.as_dict()
    assert learned["a"]["model.layers.0.self_attn.q_proj.weight"] != pytest.approx(0.3)  # it learned
    # the written model is θ_0 + Σ_k c_k ⊙ ΔW_k with the learned coefficients
    tv = TaskVectors.from_models(base, {n: str(tmp_path / n) for n in ("a", "b")})
    written = dict(open_weights(str(result.run_dir / "merged")))
    for key in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight", "model.norm.weight"):
        expected = base.state_dict()[key] + sum(learned[n][key] * tv[key][k] for k, n in enumerate(("a", "b")))
        torch.testing.assert_close(written[key].float(), expected, rtol=0, atol=1e-5, msg=key)


# ---------------------------------------------------------------------- refusals


def edit_config(folder, **changes):
    file = folder / "adapter_config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, r"adapter_config.json: use_dora=True is not plain LoRA"),
    ({"peft_type": "IA3"}, r"adapter_config.json: peft_type is 'IA3'; only LoRA"),
    ({"bias": "all"}, r"adapter_config.json: bias='all' .* only bias='none'"),
    ({"lora_bias": True}, r"adapter_config.json: lora_bias=True is not plain LoRA"),
    ({"r": 0}, r"adapter_config.json: r must be a positive number"),
])
def test_unsupported_adapters_are_refused_naming_the_field(tiny_llama, write_adapter, tmp_path, change, message):
    base = tiny_llama()
    write_adapter(base, tmp_path / "a", **CONFIGS["plain"])
    edit_config(tmp_path / "a", **change)
    with pytest.raises(ValueError, match=message):
        TaskVectors.from_models(base, {"a": str(tmp_path / "a")})


def test_lora_key_matching_no_base_parameter_is_refused_naming_it(tiny_llama, write_adapter, tmp_path):
    base = tiny_llama()
    write_adapter(base, tmp_path / "a", **CONFIGS["plain"])
    # the bare decoder has no "model." prefix: the adapter, trained on the causal LM, does not fit it
    with pytest.raises(KeyError, match=r"expert 'a' .*adapter_model.safetensors: LoRA key for 'model.layers.0.mlp.down_proj.weight' "
                                       r"matches no parameter of the pretrained model"):
        TaskVectors.from_models(base.model, {"a": str(tmp_path / "a")})


def test_adapter_without_its_base_is_refused_where_weights_are_read(tiny_llama, write_adapter, tmp_path):
    """open_weights cannot read an adapter alone, so FW's member_scores (which reads a member through it)
    refuses an adapter folder by name, and scores one opened over its base as θ_0 + ΔW (frank_wolfe_merge
    opens adapter folders over θ_0 itself: test_lora_fw.py)."""
    from adamerge.learning.frank_wolfe import member_scores

    base = tiny_llama()
    write_adapter(base, tmp_path / "a", **CONFIGS["plain"])
    with pytest.raises(UnreadableInput, match=r"expert 'a' .*/a: a PEFT adapter \(adapter_config.json\) holds ΔW, not weights"):
        open_weights(str(tmp_path / "a"), "expert 'a'")
    state = base.state_dict()
    gradient = {key: torch.randn(state[key].shape) for key in ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight")}
    with pytest.raises(UnreadableInput, match=r"/a: a PEFT adapter"):
        member_scores(gradient, state, str(tmp_path / "a"))
    opened = open_adapter(tmp_path / "a", state)
    assert isinstance(opened, LoraExpert) and open_weights(opened) is opened
    scores = member_scores(gradient, state, opened)  # <g, θ_k − θ_0> = <g, ΔW>
    delta = TaskVectors.from_models(base, {"a": str(tmp_path / "a")})["model.layers.0.self_attn.q_proj.weight"][0]
    key = "model.layers.0.self_attn.q_proj.weight"
    assert scores[key] == pytest.approx(float((gradient[key] * delta).sum()), rel=1e-4)
    assert scores["model.norm.weight"] == 0.0
