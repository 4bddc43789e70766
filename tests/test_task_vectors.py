"""TaskVectors: sources, scope, storage dtype, bad input, and TIES/DARE applied through them."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from adamerge import TaskVectors
from adamerge.core.scope import name_experts
from fixtures.families import make_bert, make_mlp, perturbed

# ---------------------------------------------------------------------- building


def expected_vectors(pretrained: nn.Module, experts: list[nn.Module]) -> dict[str, torch.Tensor]:
    base = dict(pretrained.named_parameters())
    return {
        key: torch.stack([dict(e.named_parameters())[key].detach() - value.detach() for e in experts])
        for key, value in base.items()
    }


def assert_vectors_equal(tv: TaskVectors, expected: dict[str, torch.Tensor]) -> None:
    assert tv.keys == list(expected)
    for key, value in expected.items():
        assert torch.equal(tv[key], value), key


def test_from_modules_is_theta_minus_theta0():
    pretrained = make_mlp()
    experts = [perturbed(pretrained, seed) for seed in (1, 2)]
    tv = TaskVectors.from_models(pretrained, experts)
    assert tv.expert_names == ("expert_0", "expert_1")
    assert tv.num_experts == 2 and tv.dtype == torch.float32
    assert tv["0.weight"].shape == (2, 7, 6)
    assert_vectors_equal(tv, expected_vectors(pretrained, experts))
    assert tv.numel() == sum(p.numel() for p in pretrained.parameters())
    l1 = tv.l1_norms()["2.bias"]
    assert torch.allclose(l1, tv["2.bias"].abs().sum(dim=1))


def test_every_source_kind_gives_the_same_vectors(tmp_path):
    pretrained = make_mlp()
    experts = [perturbed(pretrained, seed) for seed in (1, 2, 3, 4, 5)]
    save_file({k: v.contiguous() for k, v in experts[1].state_dict().items()}, str(tmp_path / "e1.safetensors"))
    torch.save(experts[2].state_dict(), tmp_path / "e2.bin")
    torch.save({"state_dict": experts[3].state_dict(), "epoch": torch.tensor(3)}, tmp_path / "e3.pt")
    (tmp_path / "hf").mkdir()
    save_file({k: v.contiguous() for k, v in experts[4].state_dict().items()}, str(tmp_path / "hf" / "model.safetensors"))
    sources = [experts[0], tmp_path / "e1.safetensors", str(tmp_path / "e2.bin"), tmp_path / "e3.pt", tmp_path / "hf"]
    tv = TaskVectors.from_models(pretrained, sources)
    assert_vectors_equal(tv, expected_vectors(pretrained, experts))
    # the pretrained model as a state dict or a file gives the same vectors
    from_state = TaskVectors.from_models(pretrained.state_dict(), sources)
    assert_vectors_equal(from_state, expected_vectors(pretrained, experts))
    from_dict_expert = TaskVectors.from_models(pretrained, [experts[0].state_dict()])
    assert torch.equal(from_dict_expert["0.weight"][0], tv["0.weight"][0])


def test_torch_files_load_with_weights_only(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    pretrained = make_mlp()
    torch.save({**pretrained.state_dict(), "payload": Payload()}, tmp_path / "evil.bin")
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        TaskVectors.from_models(pretrained, [tmp_path / "evil.bin"])


def test_hf_model_directories_with_tied_embeddings(tmp_path):
    pretrained = make_bert()
    experts = [perturbed(pretrained, seed, scale=0.05) for seed in (1, 2)]
    experts[0].save_pretrained(tmp_path / "e0")
    experts[1].save_pretrained(tmp_path / "e1", max_shard_size="10KB")  # sharded, with an index
    assert (tmp_path / "e1" / "model.safetensors.index.json").exists()
    expected = expected_vectors(pretrained, experts)
    tv = TaskVectors.from_models(pretrained, [tmp_path / "e0", str(tmp_path / "e1")])
    assert_vectors_equal(tv, expected)
    assert "cls.predictions.decoder.weight" not in tv  # the tied alias is merged as its canonical name
    # the pretrained model as a directory too, with an expert given as a module (which carries the aliases)
    pretrained.save_pretrained(tmp_path / "base")
    mixed = TaskVectors.from_models(tmp_path / "base", [tmp_path / "e0", experts[1]])
    for key in expected:
        assert torch.equal(mixed[key], expected[key]), key


def test_named_experts_keep_their_names():
    pretrained = make_mlp()
    experts = {"math": perturbed(pretrained, 1), "code": perturbed(pretrained, 2)}
    tv = TaskVectors.from_models(pretrained, experts)
    assert tv.expert_names == ("math", "code")
    assert torch.equal(tv["4.bias"][1], experts["code"][4].bias.detach() - pretrained[4].bias.detach())


def test_bf16_storage_halves_the_memory():
    pretrained = make_mlp()
    experts = [perturbed(pretrained, 1), perturbed(pretrained, 2)]
    full = TaskVectors.from_models(pretrained, experts)
    half = TaskVectors.from_models(pretrained, experts, dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    assert half.nbytes() * 2 == full.nbytes() == 4 * 2 * full.numel()
    assert torch.equal(half["0.weight"], full["0.weight"].to(torch.bfloat16))
    assert full.to(torch.bfloat16).nbytes() == half.nbytes()
    with pytest.raises(ValueError, match="unknown dtype 'float7'"):
        TaskVectors.from_models(pretrained, experts, dtype="float7")


def test_include_exclude_scope():
    pretrained = make_mlp()
    experts = [perturbed(pretrained, 1)]
    assert TaskVectors.from_models(pretrained, experts, include=r"weight$").keys == ["0.weight", "2.weight", "4.weight"]
    assert TaskVectors.from_models(pretrained, experts, exclude=[r"^4\.", "bias"]).keys == ["0.weight", "2.weight"]
    assert TaskVectors.from_models(pretrained, experts, include=[r"^0\.", r"^4\."], exclude="bias").keys == [
        "0.weight",
        "4.weight",
    ]


def test_select_and_to():
    tv = TaskVectors({"w": torch.randn(2, 3), "b": torch.randn(2)}, ["x", "y"])
    picked = tv.select(["b"])
    assert picked.keys == ["b"] and picked.expert_names == ("x", "y") and picked["b"] is tv["b"]
    with pytest.raises(KeyError, match="'nope'"):
        tv.select(["nope"])
    assert tv.to(dtype=torch.float16)["w"].dtype == torch.float16
    assert tv["w"].dtype == torch.float32  # a copy


def test_save_load_round_trip(tmp_path):
    tv = TaskVectors({"w": torch.randn(2, 3, 4), "b": torch.randn(2, 3).to(torch.bfloat16)}, ["math", "code"])
    tv.save(tmp_path / "tv.safetensors")
    loaded = TaskVectors.load(tmp_path / "tv.safetensors")
    assert loaded.expert_names == ("math", "code")
    assert set(loaded.keys) == {"w", "b"}
    assert torch.equal(loaded["w"], tv["w"]) and torch.equal(loaded["b"], tv["b"])
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an adamerge task-vector file"):
        TaskVectors.load(tmp_path / "other.safetensors")
    assert list(tmp_path.iterdir()) and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------- bad input


@pytest.fixture
def pool():
    pretrained = make_mlp()
    return pretrained, perturbed(pretrained, 1).state_dict()


def test_missing_key_names_expert_and_key(pool):
    pretrained, expert = pool
    healthy = dict(expert)
    del expert["2.bias"]
    with pytest.raises(KeyError, match=r"expert 'broken' is missing 1 key\(s\).*'2\.bias'"):
        TaskVectors.from_models(pretrained, {"ok": healthy, "broken": expert})


def test_missing_key_hints_at_a_prefix(pool):
    pretrained, expert = pool
    prefixed = {f"model.{k}": v for k, v in expert.items()}
    with pytest.raises(KeyError, match=r"'model\.0\.weight'.*strip the prefix 'model\.'"):
        TaskVectors.from_models(pretrained, [prefixed])


def test_extra_key_errors_and_exclude_fixes_it(pool):
    pretrained, expert = pool
    expert["classifier.weight"] = torch.zeros(2, 3)
    with pytest.raises(KeyError, match=r"expert 'expert_0' has key 'classifier\.weight'.*exclude=\['classifier'\]"):
        TaskVectors.from_models(pretrained, [expert])
    tv = TaskVectors.from_models(pretrained, [expert], exclude="classifier")
    assert "classifier.weight" not in tv and len(tv) == 6


def test_shape_mismatch(pool):
    pretrained, expert = pool
    expert["4.weight"] = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"shape mismatch for '4\.weight': expert 'expert_0' has \(3, 4\).*\(3, 5\)"):
        TaskVectors.from_models(pretrained, [expert])


def test_experts_are_read_in_the_pretrained_models_dtype_and_other_kinds_are_refused(pool):
    pretrained, expert = pool
    full = TaskVectors.from_models(pretrained, [expert])
    halved = {**expert, "0.bias": expert["0.bias"].bfloat16()}
    expected = halved["0.bias"].float() - pretrained.state_dict()["0.bias"]
    assert torch.equal(TaskVectors.from_models(pretrained, [halved])["0.bias"][0], expected)
    assert torch.equal(TaskVectors.from_models(pretrained, [{**expert, "0.bias": expert["0.bias"].double()}])["0.bias"], full["0.bias"])
    with pytest.raises(ValueError, match=r"dtype mismatch for '0\.bias': expert 'expert_0' is torch\.int64"):
        TaskVectors.from_models(pretrained, [{**expert, "0.bias": expert["0.bias"].long()}])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_expert(pool, bad):
    pretrained, expert = pool
    expert["2.weight"] = expert["2.weight"].clone()
    expert["2.weight"][1, 2] = bad
    with pytest.raises(ValueError, match=r"expert 'sick' has non-finite values \(NaN/inf\) in '2\.weight'"):
        TaskVectors.from_models(pretrained, {"sick": expert})


def test_nan_in_pretrained(pool):
    pretrained, expert = pool
    with torch.no_grad():
        pretrained[4].bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"the pretrained model has non-finite values \(NaN/inf\) in '4\.bias'"):
        TaskVectors.from_models(pretrained, [expert])


def test_expert_identical_to_base_warns_with_its_name(pool):
    pretrained, expert = pool
    with pytest.warns(UserWarning, match=r"expert 'copycat' is identical to the pretrained model"):
        tv = TaskVectors.from_models(pretrained, {"real": expert, "copycat": copy.deepcopy(pretrained)})
    assert all(not t[1].any() for _, t in tv.items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TaskVectors.from_models(pretrained, {"real": expert})  # no warning for a real expert


def test_empty_scope(pool):
    pretrained, expert = pool
    with pytest.raises(ValueError, match=r"the merge scope is empty: include='nothing'"):
        TaskVectors.from_models(pretrained, [expert], include="nothing")
    with pytest.raises(ValueError, match="the merge scope is empty"):
        TaskVectors.from_models(pretrained, [expert], exclude=".")


def test_experts_must_be_a_collection(pool, tmp_path):
    pretrained, expert = pool
    with pytest.raises(TypeError, match="not a single model"):
        TaskVectors.from_models(pretrained, perturbed(pretrained, 3))
    with pytest.raises(TypeError, match="not a single model"):
        TaskVectors.from_models(pretrained, str(tmp_path / "expert.safetensors"))
    with pytest.raises(TypeError, match="not a single state dict"):
        TaskVectors.from_models(pretrained, expert)
    with pytest.raises(ValueError, match="no experts given"):
        TaskVectors.from_models(pretrained, [])
    with pytest.raises(ValueError, match="no experts given"):
        name_experts({})
    with pytest.raises(FileNotFoundError, match="no weights at"):
        TaskVectors.from_models(pretrained, [tmp_path / "missing.safetensors"])


def test_task_vector_construction_checks():
    with pytest.raises(ValueError, match="unique"):
        TaskVectors({"w": torch.zeros(2, 3)}, ["a", "a"])
    with pytest.raises(ValueError, match=r"'w' has 3 experts on dim 0, expected 2"):
        TaskVectors({"w": torch.zeros(3, 3)}, ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        TaskVectors({}, ["a"])


# ---------------------------------------------------------------------- TIES / DARE on hand-computed tensors


def test_trim_through_task_vectors_per_tensor_and_per_model():
    tv = TaskVectors(
        {
            "w": torch.tensor([[1.0, -2.0, 3.0, 0.0], [-3.0, 1.0, 2.0, 0.0]]),
            "b": torch.tensor([[1.0, 0.0], [0.0, 2.0]]),
        },
        ["a", "b"],
    )
    per_tensor = tv.trim(0.5, scope="tensor")
    assert torch.equal(per_tensor["w"], torch.tensor([[0.0, -2.0, 3.0, 0.0], [-3.0, 0.0, 2.0, 0.0]]))
    assert torch.equal(per_tensor["b"], torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    # per model: one threshold per expert over all 6 entries, top 3.
    # expert a: |3|, |-2|, then 1 twice -> threshold 1 keeps both ones; expert b: 3, 2, 2 -> threshold 2
    assert tv.model_thresholds(0.5).tolist() == [1.0, 2.0]
    per_model = tv.trim(0.5, scope="model")
    assert torch.equal(per_model["w"], torch.tensor([[1.0, -2.0, 3.0, 0.0], [-3.0, 0.0, 2.0, 0.0]]))
    assert torch.equal(per_model["b"], torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    with pytest.raises(ValueError, match="unknown trim scope 'row'"):
        tv.trim(0.5, scope="row")


def test_elect_and_mask_and_ties_on_task_vectors():
    tv = TaskVectors({"w": torch.tensor([[1.0, 1.0, -5.0], [1.0, -3.0, 0.0], [-4.0, 1.0, 0.0]])}, ["a", "b", "c"])
    masked = tv.elect_and_mask("sum")
    assert torch.equal(masked["w"], torch.tensor([[0.0, 0.0, -5.0], [0.0, -3.0, 0.0], [-4.0, 0.0, 0.0]]))
    by_count = tv.elect_and_mask("count")
    assert torch.equal(by_count["w"], torch.tensor([[1.0, 1.0, -5.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    # ties = trim (1 of 3 per expert), then elect + mask
    tied = tv.ties(density=0.3, scope="tensor")
    assert torch.equal(tied["w"], torch.tensor([[0.0, 0.0, -5.0], [0.0, -3.0, 0.0], [-4.0, 0.0, 0.0]]))


def test_dare_on_task_vectors_is_seeded():
    tv = TaskVectors({"w": torch.ones(2, 100, 10), "b": torch.ones(2, 100)}, ["a", "b"])
    one, two = tv.dare(0.5, seed=3), tv.dare(0.5, seed=3)
    assert all(torch.equal(one[k], two[k]) for k in tv.keys)
    assert not torch.equal(one["w"], tv.dare(0.5, seed=4)["w"])
    assert set(one["w"].unique().tolist()) == {0.0, 2.0}
    assert not torch.equal(one["w"][0], one["w"][1])  # experts are dropped independently
    assert abs((one["w"] != 0).float().mean().item() - 0.5) < 0.05
