"""mergekit in and out: the YAMLs adamerge writes, run through mergekit itself, equal adamerge's
merged models tensor by tensor; a mergekit YAML read by adamerge merges to what mergekit makes of it
(data-free) or starts a learned merge from exactly its weights; what has no equal is refused, naming the key."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from adamerge.app import runner  # noqa: E402
from adamerge.app.problems import build_problem  # noqa: E402
from adamerge.io.checkpoints import open_weights  # noqa: E402
from test_export import named_zoo, zoo, zoo_recipe  # noqa: E402, F401 (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
WORDS = "the cat dog sat ran on mat red blue big small house tree".split()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama base and experts `a`, `b` (the base plus noise) as HF folders with a tokenizer,
    and 8 calibration rows."""
    from transformers import BertTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS) + 5, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])})
    tokenizer.save_pretrained(root / "base")
    for name in ("a", "b"):
        expert = LlamaForCausalLM(config)
        with torch.no_grad():
            for (key, p), q in zip(expert.named_parameters(), base.parameters()):
                p.copy_(q + 0.05 * torch.randn_like(q))
        expert.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rows = "\n".join(json.dumps({"q": " ".join(WORDS[i:i + 3]), "a": WORDS[(i + 5) % len(WORDS)]}) for i in range(8))
    (root / "rows.jsonl").write_text(rows)
    return root


def write_yaml(path, config):
    import yaml

    path.write_text(yaml.safe_dump(config))
    return path


def mergekit_merge(config_file, out):
    """mergekit's own merge of a YAML file, as its tensors."""
    mergekit = pytest.importorskip("mergekit.merge", reason="mergekit is not installed (pip install adamerge[mergekit])")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(config_file.read_text()))
    mergekit.run_merge(config, str(out), options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return dict(open_weights(str(out)))


def assert_same_tensors(ours, theirs):
    assert set(ours) == set(theirs)
    for key, tensor in theirs.items():
        torch.testing.assert_close(ours[key], tensor, rtol=1e-5, atol=2e-6, msg=key)


# ---------------------------------------------------------------------- mergekit for data-free merges


def weight_of(filters, name):
    """mergekit's rule: the first filter that is a substring of the tensor's name, else the catch-all."""
    return next(f["value"] for f in filters if "filter" not in f or f["filter"] in name)


MERGEKIT_CASES = {  # method args -> (mergekit method, weight per expert, per-model parameters, global parameters)
    "task_arithmetic": ({"scaling": [0.2, 0.5]}, "task_arithmetic", [0.2, 0.5], {}, {"normalize": False}),
    "ties": ({"density": 0.3, "scaling": 0.8, "trim_scope": "tensor"}, "ties", [1.0, 1.0], {"density": 0.3},
             {"normalize": True, "lambda": 0.8}),
    "dare": ({"density": 0.6, "scaling": 0.4}, "dare_linear", [0.4, 0.4], {"density": 0.6}, {"normalize": False}),
    "dare_ties": ({"density": 0.6, "scaling": 0.4, "sign_election": True}, "dare_ties", [1.0, 1.0], {"density": 0.6},
                  {"normalize": True, "lambda": 0.4}),
    "average": ({}, "linear", [1.0, 1.0], {}, {"normalize": True}),
}


@pytest.mark.parametrize("case", sorted(MERGEKIT_CASES))
def test_data_free_merges_write_the_mergekit_equivalent(zoo, named_zoo, tmp_path, case):
    from omegaconf import OmegaConf

    from adamerge.io.checkpoints import open_weights

    args, method, weights, per_model, parameters = MERGEKIT_CASES[case]
    name = "dare" if case == "dare_ties" else case
    result = runner.merge(zoo_recipe(zoo, named_zoo, tmp_path, case, method={"name": name, "args": args}))
    config = OmegaConf.to_container(OmegaConf.load(result.run_dir / "mergekit.yaml"))
    assert config["merge_method"] == method and config["parameters"] == parameters and config["dtype"] == "float32"
    experts = [str(named_zoo / "zoo" / t) for t in ("a", "b")]
    base = open_weights(str(zoo / "base"))
    scope = [k for k in base if k.startswith("bert.")]
    models = config["models"]
    if method == "linear":  # the base is a member, weighted only outside the merge: those tensors stay the base's
        assert "base_model" not in config and models[-1]["model"] == str(zoo / "base")
        assert all(weight_of(models[-1]["parameters"]["weight"], k) == (0.0 if k in scope else 1.0) for k in base)
        models = models[:-1]
    else:
        assert config["base_model"] == str(zoo / "base")
    assert [m["model"] for m in models] == experts
    for model, weight in zip(models, weights):
        assert {k: v for k, v in model["parameters"].items() if k != "weight"} == per_model
        for key in base:
            assert weight_of(model["parameters"]["weight"], key) == (weight if key in scope else 0.0), key
    note = (result.run_dir / "mergekit.txt").read_text()  # expert heads of 2 and 3 classes: left out, said why
    assert "classifier.bias, classifier.weight" in note and "base (2,), a (2,), b (3,)" in note
    assert ("in distribution" in note) == (name == "dare")


@pytest.mark.parametrize("method, args, reason", [
    ("ties", {"density": 0.3}, "trim_scope 'model'"),
    ("tsv", {}, "`tsv` has no mergekit equivalent"),
])
def test_merges_without_a_mergekit_equivalent_say_why(zoo, named_zoo, tmp_path, method, args, reason):
    result = runner.merge(zoo_recipe(zoo, named_zoo, tmp_path, method, method={"name": method, "args": args}))
    assert not (result.run_dir / "mergekit.yaml").exists()
    assert reason in (result.run_dir / "mergekit.txt").read_text()


def test_mergekit_skips_a_bare_encoder_base_saying_why(zoo, named_zoo):
    from dataclasses import replace

    from adamerge.app.mergekit import method_mergekit_config

    problem = build_problem(zoo_recipe(zoo, named_zoo, "unused", "x").problem)
    bare = replace(problem, description={**problem.description, "base": str(zoo / "encoder_only")})
    config, reason = method_mergekit_config("task_arithmetic", {}, bare, {"include": problem.include, "exclude": None})
    assert config is None and "bare encoder" in reason
    config, note = method_mergekit_config("task_arithmetic", {}, problem, {"include": problem.include, "exclude": None})
    assert config is not None and "classifier.weight" in note


# ---------------------------------------------------------------------- mergekit YAMLs read by adamerge


def models(llama, **parameters):
    return [{"model": str(llama / name), "parameters": parameters.get(name, {})} for name in ("a", "b")]


READ_CASES = {  # a mergekit YAML -> the adamerge method it becomes
    "task_arithmetic": (lambda llama: {"merge_method": "task_arithmetic", "base_model": str(llama / "base"),
                                       "models": models(llama, a={"weight": 0.3}, b={"weight": 0.7}),
                                       "parameters": {"lambda": 0.9, "int8_mask": True}, "dtype": "float32"},
                        "task_arithmetic", {"scaling": [pytest.approx(0.27), pytest.approx(0.63)]}),
    "ties": (lambda llama: {"merge_method": "ties", "base_model": str(llama / "base"),
                            "models": models(llama, a={"weight": 1.0}, b={"weight": 1.0}),
                            "parameters": {"density": 0.5, "lambda": 0.8}, "dtype": "float32"},
             "ties", {"density": 0.5, "scaling": 0.8, "trim_scope": "tensor", "sign_method": "sum"}),
    "linear": (lambda llama: {"merge_method": "linear", "dtype": "float32",  # no base: the first model is the reference
                              "models": models(llama, a={"weight": 1.0}, b={"weight": 3.0})},
               "task_arithmetic", {"scaling": [0.75]}),
}


@pytest.mark.parametrize("case", sorted(READ_CASES))
def test_a_mergekit_yaml_merges_to_what_mergekit_makes_and_writes_one_mergekit_agrees_with(llama, tmp_path, capsys, case):
    from adamerge.app.cli import main

    build, method, args = READ_CASES[case]
    config = write_yaml(tmp_path / "merge.yml", build(llama))
    assert main(["merge", "--from-mergekit", str(config), f"output_dir={tmp_path}/run"]) == 0
    recipe = json.loads(json.dumps(__import__("omegaconf").OmegaConf.to_container(
        __import__("omegaconf").OmegaConf.load(tmp_path / "run" / "recipe.yaml"))))
    assert recipe["method"]["name"] == method and recipe["method"]["args"] == args
    assert ("int8_mask ignored" in capsys.readouterr().out) == (case == "task_arithmetic")
    ours = dict(open_weights(str(tmp_path / "run" / "merged")))
    assert_same_tensors(ours, mergekit_merge(config, tmp_path / "theirs"))
    assert_same_tensors(ours, mergekit_merge(tmp_path / "run" / "mergekit.yaml", tmp_path / "written"))


def test_a_learned_run_starts_from_the_yamls_per_tensor_weights_and_writes_them_back(llama, tmp_path):
    """Gradients and filters become layer-wise init values (checked by hand: mergekit's t is 0 outside
    the layers, i/(n−1) in layer i); the learned run's mergekit.yaml, run by mergekit, is its merged model."""
    from adamerge.app.builders import build_coefficients
    from adamerge.app.from_mergekit import fit_recipe

    config = write_yaml(tmp_path / "merge.yml", {
        "merge_method": "task_arithmetic", "base_model": str(llama / "base"), "dtype": "float32",
        "models": models(llama, a={"weight": [0.2, 0.6]}, b={"weight": [{"filter": "mlp", "value": 0.5}, {"value": 0.1}]}),
    })
    source = {"path": str(llama / "rows.jsonl")}
    tasks = {n: {"expert": str(llama / n), "text": "q", "response": "a", "calibration": source} for n in ("a", "b")}
    write_yaml(tmp_path / "recipe.yaml", {
        "name": "learned", "output_dir": str(tmp_path / "run"), "objectives": [{"name": "entropy"}],
        "problem": {"kind": "hf_causal_lm", "max_length": 16, "tasks": tasks}, "coefficients": {"granularity": "layer"},
        "optimizer": {"lr": 0.05}, "evaluation": {"enabled": False}, "export": {"plot": False},
        "trainer": {"max_steps": 2, "batch_size": 2, "progress_bar": False, "accelerator": "cpu", "log_every_n_steps": 1},
    })
    recipe, _ = fit_recipe(config, str(tmp_path / "recipe.yaml"))
    assert recipe.problem.pretrained == str(llama / "base")
    initial = build_coefficients(recipe, build_problem(recipe.problem))[0].as_dict()
    expected_a = {"model.embed_tokens.weight": 0.2, "model.layers.0.mlp.up_proj.weight": 0.2,
                  "model.layers.1.self_attn.q_proj.weight": 0.6, "lm_head.weight": 0.2}
    for key, value in expected_a.items():
        assert initial["a"][key] == pytest.approx(value), key
    assert initial["b"]["model.layers.1.mlp.down_proj.weight"] == pytest.approx(0.5)
    assert initial["b"]["model.layers.1.input_layernorm.weight"] == pytest.approx(0.1)

    result = runner.fit(recipe)
    learned = result.merged.coefficients.as_dict()
    assert learned["a"]["model.layers.1.self_attn.q_proj.weight"] != pytest.approx(0.6)  # it learned
    ours = dict(open_weights(str(result.run_dir / "merged")))
    assert_same_tensors(ours, mergekit_merge(result.run_dir / "mergekit.yaml", tmp_path / "theirs"))


def test_per_tensor_weights_cannot_start_task_wise_coefficients(llama, tmp_path):
    from adamerge.app.from_mergekit import fit_recipe

    config = write_yaml(tmp_path / "merge.yml", {"merge_method": "task_arithmetic", "base_model": str(llama / "base"),
                                                 "models": models(llama, a={"weight": [0.2, 0.6]}, b={"weight": 0.4})})
    tasks = {n: {"expert": str(llama / n), "calibration": {"path": str(llama / "rows.jsonl")}} for n in ("a", "b")}
    write_yaml(tmp_path / "recipe.yaml", {"problem": {"kind": "hf_causal_lm", "tasks": tasks}, "coefficients": {"granularity": "task"}})
    with pytest.raises(ValueError, match="coefficients.granularity task: .* weights vary over tensors"):
        fit_recipe(config, str(tmp_path / "recipe.yaml"))


REFUSALS = [  # (what changes in a ties YAML, the one-line error)
    ({"slices": []}, "`slices` has no adamerge equivalent"),
    ({"merge_method": "slerp"}, "merge_method 'slerp'"),
    ({"parameters": {"density": 0.5, "normalize": False}}, "parameters.normalize: false"),
    ({"parameters": {"density": 0.3}}, "parameters.density: density 0.3: mergekit keeps int"),
    ({"models": "unequal"}, r"models\[\*\].parameters.weight: adamerge's ties weighs every expert equally"),
    ({"merge_method": "dare_linear", "parameters": {"rescale": False}}, "parameters.rescale: False"),
    ({"merge_method": "task_arithmetic", "models": "gradient"}, "the weight of a varies over tensors"),
    ({"tokenizer_source": "union"}, "tokenizer_source 'union'"),
    ({"parameters": {"epsilon": 0.1}}, "parameters.epsilon: mergekit's ties does not take it"),
]


@pytest.mark.parametrize("change, message", REFUSALS)
def test_what_has_no_adamerge_equal_is_refused_naming_the_key(llama, tmp_path, change, message):
    from adamerge.app.from_mergekit import merge_recipe

    config = {"merge_method": "ties", "base_model": str(llama / "base"), "parameters": {"density": 0.5},
              "models": models(llama, a={"weight": 1.0}, b={"weight": 1.0})}
    config.update(change)
    if change.get("models") == "unequal":
        config["models"] = models(llama, a={"weight": 1.0}, b={"weight": 2.0})
    if change.get("models") == "gradient":
        config["models"] = models(llama, a={"weight": [0.1, 0.9]}, b={"weight": 1.0})
    with pytest.raises(ValueError, match=message):
        merge_recipe(write_yaml(tmp_path / "merge.yml", config))
