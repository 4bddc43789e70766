"""mergekit in: a mergekit YAML read by adamerge merges to what mergekit makes of it (data-free) or
starts a learned merge from exactly its weights, and the YAMLs those runs write, run through mergekit
itself, equal adamerge's merged models tensor by tensor; what has no equal is refused, naming the key;
building a recipe writes no file."""

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


def learned_inputs(llama, folder, granularity="layer", **coefficients):
    """A task_arithmetic YAML whose weights vary over tensors (a gradient for a, filters for b) and a
    learning recipe over the same base and experts, in ``folder``."""
    config = write_yaml(folder / "merge.yml", {
        "merge_method": "task_arithmetic", "base_model": str(llama / "base"), "dtype": "float32",
        "models": models(llama, a={"weight": [0.2, 0.6]}, b={"weight": [{"filter": "mlp", "value": 0.5}, {"value": 0.1}]}),
    })
    source = {"path": str(llama / "rows.jsonl")}
    tasks = {n: {"expert": str(llama / n), "text": "q", "response": "a", "calibration": source} for n in ("a", "b")}
    write_yaml(folder / "recipe.yaml", {
        "name": "learned", "output_dir": str(folder / "run"), "objectives": [{"name": "entropy"}],
        "problem": {"kind": "hf_causal_lm", "max_length": 16, "tasks": tasks},
        "coefficients": {"granularity": granularity, **coefficients},
        "optimizer": {"lr": 0.05}, "evaluation": {"enabled": False}, "export": {"plot": False},
        "trainer": {"max_steps": 2, "batch_size": 2, "progress_bar": False, "accelerator": "cpu", "log_every_n_steps": 1},
    })
    return config, folder / "recipe.yaml"


# each expert's starting value on some tensors, by hand: mergekit's t is 0 outside the layers, i/(n−1) in layer i
EXPECTED = {"a": {"model.embed_tokens.weight": 0.2, "model.layers.0.mlp.up_proj.weight": 0.2,
                  "model.layers.1.self_attn.q_proj.weight": 0.6, "lm_head.weight": 0.2},
            "b": {"model.layers.1.mlp.down_proj.weight": 0.5, "model.layers.1.input_layernorm.weight": 0.1}}


def test_a_learned_run_starts_from_the_yamls_per_tensor_weights_and_writes_them_back(llama, tmp_path):
    """Gradients and filters become per-tensor init values in the recipe, written nowhere: the run
    starts its coefficients from them, and its mergekit.yaml, run by mergekit, is its merged model."""
    from adamerge.app.mergekit.recipe import fit_recipe

    config, source = learned_inputs(llama, tmp_path)
    files = sorted(tmp_path.rglob("*"))
    recipe, _ = fit_recipe(config, str(source))
    assert sorted(tmp_path.rglob("*")) == files  # building the recipe wrote nothing
    assert recipe.problem.pretrained == str(llama / "base")
    for name, values in EXPECTED.items():
        for key, value in values.items():
            assert recipe.coefficients.init[name][key] == pytest.approx(value), (name, key)

    result = runner.fit(recipe)
    coefficients = result.merged.coefficients
    for k, name in enumerate(coefficients.layout.expert_names):
        for key, value in EXPECTED[name].items():
            assert float(coefficients.initial[k, coefficients.layout.tensor_slots[key][0]]) == pytest.approx(value), key
    assert coefficients.as_dict()["a"]["model.layers.1.self_attn.q_proj.weight"] != pytest.approx(0.6)  # it learned
    ours = dict(open_weights(str(result.run_dir / "merged")))
    assert_same_tensors(ours, mergekit_merge(result.run_dir / "mergekit.yaml", tmp_path / "theirs"))


@pytest.mark.parametrize("granularity, options", [("layer", {}), ("chunk", {"chunks": 2}), ("element", {})])
def test_every_fine_granularity_starts_from_the_per_tensor_weights(llama, tmp_path, granularity, options):
    from adamerge.app.builders import build_coefficients
    from adamerge.app.mergekit.recipe import fit_recipe

    config, source = learned_inputs(llama, tmp_path, granularity, **options)
    recipe, _ = fit_recipe(config, str(source))
    initial = build_coefficients(recipe, build_problem(recipe.problem))[0].as_dict()
    for name, values in EXPECTED.items():
        for key, value in values.items():
            expected = [value] * options["chunks"] if granularity == "chunk" else value
            assert initial[name][key] == pytest.approx(expected), (name, key)


def test_a_recipe_that_fails_to_load_leaves_no_file(llama, tmp_path, monkeypatch):
    """The per-tensor weights travel in the recipe: when the assembled recipe does not load, nothing
    of it was written (no coefficients file beside the run directory, nothing anywhere)."""
    from adamerge.app.checks import RecipeError
    from adamerge.app.mergekit import recipe as module

    config, source = learned_inputs(llama, tmp_path)
    real = module.load_recipe

    def failing(recipe, overrides=None):
        if isinstance(recipe, dict):  # the recipe fit_recipe assembles (the user's is read from its file)
            raise RecipeError("the assembled recipe does not load")
        return real(recipe, overrides)

    monkeypatch.setattr(module, "load_recipe", failing)
    files = sorted(tmp_path.rglob("*"))
    with pytest.raises(RecipeError, match="does not load"):
        module.fit_recipe(config, str(source))
    assert sorted(tmp_path.rglob("*")) == files


def test_a_per_tensor_init_without_a_merged_tensor_is_refused_naming_it(llama, tmp_path):
    from adamerge.app.builders import build_coefficients
    from adamerge.app.checks import RecipeError
    from adamerge.app.config import load_recipe, to_plain
    from adamerge.app.mergekit.recipe import fit_recipe

    config, source = learned_inputs(llama, tmp_path)
    plain = to_plain(fit_recipe(config, str(source))[0])
    del plain["coefficients"]["init"]["b"]["lm_head.weight"]
    recipe = load_recipe(plain)
    with pytest.raises(RecipeError, match="coefficients.init.b: expected a number for tensor lm_head.weight, got None"):
        build_coefficients(recipe, build_problem(recipe.problem))


def test_per_tensor_weights_cannot_start_task_wise_coefficients(llama, tmp_path):
    from adamerge.app.mergekit.recipe import fit_recipe

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
    from adamerge.app.mergekit.recipe import merge_recipe

    config = {"merge_method": "ties", "base_model": str(llama / "base"), "parameters": {"density": 0.5},
              "models": models(llama, a={"weight": 1.0}, b={"weight": 1.0})}
    config.update(change)
    if change.get("models") == "unequal":
        config["models"] = models(llama, a={"weight": 1.0}, b={"weight": 2.0})
    if change.get("models") == "gradient":
        config["models"] = models(llama, a={"weight": [0.1, 0.9]}, b={"weight": 1.0})
    with pytest.raises(ValueError, match=message):
        merge_recipe(write_yaml(tmp_path / "merge.yml", config))
