"""MergedModel: exact merges at every granularity, gradients, tied weights, BatchNorm, caching."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from adamerge import MergedModel, TaskVectors, build_layout
from adamerge.core.scope import parameter_aliases
from fixtures.families import BERT_ALIASES, Family, bert_config, make_mlp, perturbed

# ---------------------------------------------------------------------- independent reference


def expected_slot_names(key: str, granularity: str, family: Family, groups=None) -> list[str]:
    """The slot name(s) of each chunk of ``key``, written from the documented rules."""
    if granularity == "task":
        return ["all"]
    if granularity == "layer":
        return [key]
    if granularity == "group":
        if groups == "block":
            parts = key.split(".")
            for i, part in enumerate(parts):
                if part.isdigit():
                    return [".".join(parts[: i + 1])]
            return [".".join(parts[:-1])]
        for name, pattern in family.groups.items():
            if re.search(pattern, key):
                return [name]
        return ["other"]
    assert granularity == "chunk"
    if key in family.chunks:
        m = family.chunks[key]
    else:
        m = next((v for p, v in family.chunks.items() if re.search(p, key)), 1)
    if m == 0:
        return [f"{key} (frozen)"]
    if m == 1:
        return [key]
    return [f"{key}[{j}/{m}]" for j in range(m)]


def reference_state(family: Family, coefficients: dict[str, torch.Tensor], tau_dtype=None) -> dict:
    """θ_0 + Σ_k c_k (θ_k − θ_0), chunk by chunk (rows split as torch.tensor_split), from raw weights.

    ``coefficients[key]`` is ``[K, m]``: one value per expert and chunk of that tensor.
    ``tau_dtype`` rounds each task vector through that dtype first (to model bf16 storage).
    """
    base = family.pretrained.state_dict()
    experts = [e.state_dict() for e in family.experts.values()]
    state = {name: tensor.detach().clone() for name, tensor in base.items()}
    for key, c in coefficients.items():
        theta0 = base[key].detach()
        merged = theta0.clone()
        for j, rows in enumerate(torch.arange(theta0.shape[0]).tensor_split(c.shape[1])):
            value = theta0[rows].clone()
            for k, expert in enumerate(experts):
                tau = expert[key][rows] - theta0[rows]
                if tau_dtype is not None:
                    tau = tau.to(tau_dtype).float()
                value += c[k, j] * tau
            merged[rows] = value
        state[key] = merged
    for alias, canonical in family.aliases.items():
        state[alias] = state[canonical]
    return state


def reference_model(family: Family, state: dict) -> nn.Module:
    model = family.fresh()
    model.load_state_dict(state)
    return model.eval()


def random_init(tv: TaskVectors, granularity: str, seed: int = 5, **options) -> torch.Tensor:
    shapes = {k: tuple(t.shape[1:]) for k, t in tv.items()}
    layout = build_layout(tv.expert_names, shapes, granularity, **options)
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(layout.num_experts, layout.num_slots, generator=generator) * 1.5 - 0.5


def build(family: Family, granularity: str, groups=None, use_chunks=False, tv=None, seed=5, constraint=None):
    options = {}
    if groups is not None:
        options["groups"] = groups
    if use_chunks:
        options["chunks"] = family.chunks
    tv = tv if tv is not None else TaskVectors.from_models(family.pretrained, family.experts)
    init = random_init(tv, granularity, seed=seed, **options)
    merged = MergedModel(family.fresh(), tv, granularity, init=init, constraint=constraint, **options)
    return merged, init


def coefficient_table(merged: MergedModel, init: torch.Tensor, family: Family, granularity: str, groups=None):
    """``key -> [K, m]`` coefficient per expert and chunk, from *our* slot naming, not the layout's map."""
    names = list(merged.layout.slot_names)
    table = {}
    for key in merged.keys:
        expected = expected_slot_names(key, granularity, family, groups)
        table[key] = torch.stack([init[:, names.index(name)] for name in expected], dim=1)
    return table


CONFIGS = {
    "task": ("task", None, False),
    "layer": ("layer", None, False),
    "group-block": ("group", "block", False),
    "group-regex": ("group", "regex", False),
    "chunk": ("chunk", None, True),
}


def _groups(family, groups):
    return family.groups if groups == "regex" else groups


# ---------------------------------------------------------------------- exactness


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_merge_is_exact_at_every_granularity(family, config):
    granularity, groups, use_chunks = CONFIGS[config]
    groups = _groups(family, groups)
    merged, init = build(family, granularity, groups=groups, use_chunks=use_chunks)
    # the layout is the one the documented rules give, slot for slot
    expected_names = {n for key in merged.keys for n in expected_slot_names(key, granularity, family, groups)}
    assert set(merged.layout.slot_names) == expected_names
    for key in merged.keys:
        slots = merged.layout.tensor_slots[key]
        assert [merged.layout.slot_names[s] for s in slots] == expected_slot_names(key, granularity, family, groups)
    assert torch.equal(merged.coefficients().detach(), init)

    reference = reference_model(family, reference_state(family, coefficient_table(merged, init, family, granularity, groups)))
    with torch.no_grad():
        expected = family.run(reference)
        cached = family.run(merged)
    graphed = family.run(merged)
    assert graphed.requires_grad
    assert (graphed.detach() - expected).abs().max() < 1e-5
    assert (cached - expected).abs().max() < 1e-5
    # the coefficients matter: the plain pretrained model gives a different output
    with torch.no_grad():
        assert (family.run(family.pretrained) - expected).abs().max() > 1e-3


def test_chunk_layout_covers_uneven_and_frozen_cases(mlp):
    merged, init = build(mlp, "chunk", use_chunks=True)
    layout = merged.layout
    names = layout.slot_names
    assert [names[s] for s in layout.tensor_slots["0.weight"]] == ["0.weight[0/3]", "0.weight[1/3]", "0.weight[2/3]"]
    assert len(layout.tensor_slots["0.bias"]) == 7  # m equal to the number of rows
    assert len(layout.tensor_slots["4.bias"]) == 2  # from the regex, 3 rows: uneven
    frozen = layout.tensor_slots["4.weight"]
    assert len(frozen) == 1 and frozen[0] in layout.frozen
    assert merged.coefficients.raw.shape == (3, layout.num_slots - 1)
    # row r of 0.weight (7 rows, 3 chunks) reads chunk [0,0,0,1,1,2,2][r] (larger chunks first)
    rows = merged.coefficients.row_values("0.weight").detach()
    columns = [layout.tensor_slots["0.weight"][j] for j in (0, 0, 0, 1, 1, 2, 2)]
    assert torch.equal(rows, init[:, columns])


def test_group_block_on_mlp_and_regex_on_bert(mlp, bert):
    merged, _ = build(mlp, "group", groups="block")
    assert sorted(merged.layout.slot_names) == ["0", "2", "4"]
    assert merged.layout.tensor_slots["0.weight"] == merged.layout.tensor_slots["0.bias"]
    merged, _ = build(bert, "group", groups=bert.groups)
    assert sorted(merged.layout.slot_names) == ["embeddings", "layer0", "layer1", "other"]
    slots = merged.layout.tensor_slots
    names = merged.layout.slot_names
    assert names[slots["bert.encoder.layer.1.output.dense.weight"][0]] == "layer1"
    assert names[slots["cls.predictions.transform.dense.weight"][0]] == "other"


def test_uneven_chunks_with_rows_not_divisible(mlp):
    """7 rows in 3 chunks: the reference splits rows itself; compare the merged tensor directly."""
    merged, init = build(mlp, "chunk", use_chunks=True)
    names = list(merged.layout.slot_names)
    with torch.no_grad():
        merged_weight = merged.merged_parameters()["0.weight"]
    theta0 = mlp.pretrained[0].weight.detach()
    taus = [e[0].weight.detach() - theta0 for e in mlp.experts.values()]
    for j, rows in enumerate([slice(0, 3), slice(3, 5), slice(5, 7)]):
        c = init[:, names.index(f"0.weight[{j}/3]")]
        expected = theta0[rows] + sum(c[k] * taus[k][rows] for k in range(3))
        assert (merged_weight[rows] - expected).abs().max() < 1e-6


# ---------------------------------------------------------------------- BatchNorm / eval mode


def test_batchnorm_stats_untouched_and_backbone_stays_eval(cnn):
    merged, init = build(cnn, "layer")
    stats_before = {n: b.clone() for n, b in merged.backbone.named_buffers()}
    merged.train()
    assert merged.training
    assert not merged.backbone.training
    assert all(not m.training for m in merged.backbone.modules())
    out = cnn.run(merged)  # with a graph, in "training" mode
    out.sum().backward()
    with torch.no_grad():
        cnn.run(merged)
    for name, buffer in merged.backbone.named_buffers():
        assert torch.equal(buffer, stats_before[name]), name
    # the merge used the pretrained running stats, not the experts' (which differ)
    assert torch.equal(merged.backbone.bn1.running_mean, cnn.pretrained.bn1.running_mean)
    reference = reference_model(cnn, reference_state(cnn, coefficient_table(merged, init, cnn, "layer")))
    with torch.no_grad():
        assert (out.detach() - cnn.run(reference)).abs().max() < 1e-5
    # BatchNorm in train mode would give another output: eval mode is what made them equal
    train_mode = reference_model(cnn, reference_state(cnn, coefficient_table(merged, init, cnn, "layer"))).train()
    with torch.no_grad():
        assert (cnn.run(train_mode) - out.detach()).abs().max() > 1e-3


def test_dropout_off_after_train(bert):
    merged, _ = build(bert, "layer")
    merged.train()
    with torch.no_grad():
        first, second = bert.run(merged), bert.run(merged)
        merged.coefficients.raw.add_(0.0)  # invalidate the cache: recompute, same output
        third = bert.run(merged)
    assert torch.equal(first, second) and torch.equal(first, third)


# ---------------------------------------------------------------------- tied weights


def test_tied_embeddings_use_the_merged_value_everywhere(bert):
    assert parameter_aliases(bert.pretrained) == BERT_ALIASES
    merged, init = build(bert, "layer")
    for alias in BERT_ALIASES:
        assert alias not in merged.keys
    table = coefficient_table(merged, init, bert, "layer")
    state = reference_state(bert, table)
    with torch.no_grad():
        out = bert.run(merged)

    # an untied twin shows both uses of the embedding take the merged value in the forward
    from transformers import BertForMaskedLM

    untied = BertForMaskedLM(bert_config(tie_word_embeddings=False)).eval()
    assert parameter_aliases(untied) == {}
    untied.load_state_dict(state)
    with torch.no_grad():
        assert (bert.run(untied) - out).abs().max() < 1e-5
        untied.cls.predictions.decoder.weight.copy_(bert.pretrained.bert.embeddings.word_embeddings.weight)
        assert (bert.run(untied) - out).abs().max() > 1e-3  # an unmerged decoder would show
        untied.load_state_dict(state)
        untied.bert.embeddings.word_embeddings.weight.copy_(bert.pretrained.bert.embeddings.word_embeddings.weight)
        assert (bert.run(untied) - out).abs().max() > 1e-3  # and so would an unmerged input embedding

    exported = merged.merged_state_dict()
    for alias, canonical in BERT_ALIASES.items():
        assert torch.equal(exported[alias], exported[canonical])
        assert (exported[canonical] - state[canonical]).abs().max() < 1e-6
    assert set(exported) == set(bert.pretrained.state_dict())

    module = merged.to_module()
    embedding = module.bert.embeddings.word_embeddings.weight
    assert module.cls.predictions.decoder.weight is embedding
    assert (embedding - state["bert.embeddings.word_embeddings.weight"]).abs().max() < 1e-6
    assert not module.training and embedding.requires_grad
    with torch.no_grad():
        assert (bert.run(module) - out).abs().max() < 1e-5
    # the backbone itself still holds the pretrained weights
    assert torch.equal(
        merged.backbone.bert.embeddings.word_embeddings.weight, bert.pretrained.bert.embeddings.word_embeddings.weight
    )


@pytest.mark.parametrize("config", ["layer", "chunk"])
def test_merged_state_dict_matches_reference(family, config):
    granularity, groups, use_chunks = CONFIGS[config]
    merged, init = build(family, granularity, use_chunks=use_chunks)
    state = reference_state(family, coefficient_table(merged, init, family, granularity))
    exported = merged.merged_state_dict()
    assert set(exported) == set(state)
    for name in state:
        assert exported[name].dtype == state[name].dtype
        assert (exported[name].float() - state[name].float()).abs().max() < 1e-6, name
    module = merged.to_module()
    with torch.no_grad():
        assert (family.run(module) - family.run(merged)).abs().max() < 1e-5


# ---------------------------------------------------------------------- gradients


def loss_of(family: Family, output: torch.Tensor) -> torch.Tensor:
    target = torch.randn(output.shape, generator=torch.Generator().manual_seed(7))
    return ((output - target) ** 2).mean() + output.tanh().sum() * 0.1


def reference_coefficient_grads(family: Family, merged: MergedModel, init, granularity, tau_dtype=None):
    """``∂L/∂c`` as ``<∂L/∂W, τ_k>`` per slot, from a plain module holding the merged weights."""
    table = coefficient_table(merged, init, family, granularity)
    plain = reference_model(family, reference_state(family, table, tau_dtype=tau_dtype)).requires_grad_(True)
    named = dict(plain.named_parameters())
    loss = loss_of(family, family.run(plain))
    grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()), allow_unused=True)))
    base = family.pretrained.state_dict()
    experts = [e.state_dict() for e in family.experts.values()]
    names = list(merged.layout.slot_names)
    expected = torch.zeros(len(experts), len(names), dtype=torch.float64)
    for key in merged.keys:
        slot_names = expected_slot_names(key, granularity, family)
        grad = grads[key] if grads[key] is not None else torch.zeros_like(base[key])
        for j, rows in enumerate(torch.arange(base[key].shape[0]).tensor_split(len(slot_names))):
            for k, expert in enumerate(experts):
                tau = expert[key][rows] - base[key][rows]
                if tau_dtype is not None:
                    tau = tau.to(tau_dtype).float()
                expected[k, names.index(slot_names[j])] += (grad[rows].double() * tau.double()).sum()
    return expected.float()


def autograd_coefficient_grads(family: Family, merged: MergedModel) -> torch.Tensor:
    merged.coefficients.raw.grad = None
    loss_of(family, family.run(merged)).backward()
    layout = merged.layout
    full = torch.zeros(layout.num_experts, layout.num_slots)
    full[:, layout.trainable_slots] = merged.coefficients.raw.grad
    return full


GRADIENT_CASES = [("mlp", "task"), ("mlp", "layer"), ("mlp", "chunk"), ("cnn", "layer"), ("bert", "layer"), ("bert", "chunk")]


@pytest.mark.parametrize("name,granularity", GRADIENT_CASES)
def test_coefficient_gradient_is_inner_product_with_task_vector(request, name, granularity):
    family = request.getfixturevalue(name)
    if granularity == "chunk":  # trainable chunks only (m = 0 has no gradient by design)
        family.chunks = {k: v for k, v in family.chunks.items() if v != 0}
    merged, init = build(family, granularity, use_chunks=granularity == "chunk")
    got = autograd_coefficient_grads(family, merged)
    expected = reference_coefficient_grads(family, merged, init, granularity)
    assert got.abs().max() > 1e-4
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("granularity", ["layer", "chunk"])
def test_bf16_task_vectors_give_fp32_gradients(mlp, granularity):
    mlp.chunks = {k: v for k, v in mlp.chunks.items() if v != 0}
    tv32 = TaskVectors.from_models(mlp.pretrained, mlp.experts)
    tv16 = TaskVectors.from_models(mlp.pretrained, mlp.experts, dtype=torch.bfloat16)
    assert tv16.nbytes() * 2 == tv32.nbytes()
    merged, init = build(mlp, granularity, use_chunks=granularity == "chunk", tv=tv16)
    assert merged.task_vector("0.weight").dtype == torch.bfloat16  # stays bf16 in memory
    got = autograd_coefficient_grads(mlp, merged)
    assert got.dtype == torch.float32
    # against the same (bf16-rounded) τ upcast to fp32: tight, so the sums ran in fp32
    rounded = reference_coefficient_grads(mlp, merged, init, granularity, tau_dtype=torch.bfloat16)
    torch.testing.assert_close(got, rounded, rtol=1e-4, atol=1e-6)
    # against full fp32 τ: within bf16 rounding of τ (relative 2^-8 per entry)
    exact = reference_coefficient_grads(mlp, merged, init, granularity)
    torch.testing.assert_close(got, exact, rtol=2e-2, atol=2e-3 * exact.abs().max().item())
    with torch.no_grad():
        merged32, _ = build(mlp, granularity, use_chunks=granularity == "chunk", tv=tv32)
        assert (mlp.run(merged) - mlp.run(merged32)).abs().max() < 1e-2


@pytest.mark.parametrize("granularity", ["task", "chunk"])
def test_a_bf16_model_gets_the_float32_sum_rounded_once_and_float32_gradients(bf16_sum_case, granularity):
    base, taus, c, expected = bf16_sum_case
    rounded_first = (base.float() + (c.to(torch.bfloat16).float().view(2, 1, 1) * taus.float()).sum(dim=0)).to(torch.bfloat16)
    assert expected[0, 0] == 1.3046875 and rounded_first[0, 0] == 1.296875
    model = nn.Linear(4, 3, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.copy_(base)
    slots = 3 if granularity == "chunk" else 1  # chunk: one slot per row
    tv = TaskVectors({"weight": taus}, ["a", "b"])
    chunks = {"weight": slots} if granularity == "chunk" else None
    merged = MergedModel(model, tv, granularity, init=c.view(2, 1).expand(2, slots), chunks=chunks)
    weight = merged.merged_parameters()["weight"]
    assert weight.dtype == torch.bfloat16 and torch.equal(weight, expected)
    grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    weight.backward(grad)
    by_hand = (taus.double() * grad.double()).sum(dim=2)  # [K, rows]: one row per chunk
    by_hand = by_hand.sum(dim=1, keepdim=True) if granularity == "task" else by_hand
    assert merged.coefficients.raw.grad.dtype == torch.float32
    torch.testing.assert_close(merged.coefficients.raw.grad.double(), by_hand, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["mlp", "bert"])
@pytest.mark.parametrize("chunks", [1, {".*": 1}])
def test_chunk_with_m_one_equals_layer(request, name, chunks):
    family = request.getfixturevalue(name)
    tv = TaskVectors.from_models(family.pretrained, family.experts)
    init = random_init(tv, "layer")
    layer = MergedModel(family.fresh(), tv, "layer", init=init)
    chunk = MergedModel(family.fresh(), tv, "chunk", init=init, chunks=chunks)
    assert chunk.layout.slot_names == layer.layout.slot_names
    assert chunk.layout.tensor_slots == layer.layout.tensor_slots
    out_layer, out_chunk = family.run(layer), family.run(chunk)
    assert torch.equal(out_layer, out_chunk)
    loss_of(family, out_layer).backward()
    loss_of(family, out_chunk).backward()
    assert torch.equal(layer.coefficients.raw.grad, chunk.coefficients.raw.grad)


# ---------------------------------------------------------------------- caching


def test_merged_parameters_cached_under_no_grad_and_invalidated(mlp):
    merged, _ = build(mlp, "layer")
    with torch.no_grad():
        first = merged.merged_parameters()
        assert merged.merged_parameters() is first
        assert merged.merged_parameters()["0.weight"] is first["0.weight"]

    # with a graph: recomputed every time, differentiable
    graphed = merged.merged_parameters()
    assert graphed is not first and graphed["0.weight"].requires_grad

    # an optimiser step changes the coefficients: the cache must follow
    optimizer = torch.optim.Adam(merged.coefficients.parameters(), lr=0.1)
    mlp.run(merged).sum().backward()
    optimizer.step()
    with torch.no_grad():
        second = merged.merged_parameters()
        assert second is not first
        assert not torch.equal(second["0.weight"], first["0.weight"])
        assert merged.merged_parameters() is second
        fresh = merged._merge()
        assert torch.equal(second["0.weight"], fresh["0.weight"])

        # an in-place edit of the coefficients
        merged.coefficients.raw.mul_(0.5)
        third = merged.merged_parameters()
        assert third is not second
        assert torch.equal(third["0.weight"], merged._merge()["0.weight"])
        assert not torch.equal(third["0.weight"], second["0.weight"])

    # .to() drops the cache
    merged.to("cpu")
    with torch.no_grad():
        fourth = merged.merged_parameters()
    assert fourth is not third
    merged.to(torch.float64)
    with torch.no_grad():
        fifth = merged.merged_parameters()
        assert fifth["0.weight"].dtype == torch.float64
        assert torch.allclose(fifth["0.weight"].float(), third["0.weight"], atol=1e-6)


def test_cache_follows_sgd_and_load_state_dict(mlp):
    merged, _ = build(mlp, "chunk", use_chunks=True)
    with torch.no_grad():
        before = mlp.run(merged)
    state = copy.deepcopy(merged.coefficients.state_dict())
    optimizer = torch.optim.SGD(merged.coefficients.parameters(), lr=1.0)
    mlp.run(merged).pow(2).sum().backward()
    optimizer.step()
    with torch.no_grad():
        after = mlp.run(merged)
        assert not torch.equal(after, before)
        merged.coefficients.load_state_dict(state)
        assert torch.equal(mlp.run(merged), before)


# ---------------------------------------------------------------------- bad input


def test_scope_errors_name_the_key(bert):
    tv = TaskVectors.from_models(bert.pretrained, bert.experts, include=r"word_embeddings")
    alias = "cls.predictions.decoder.weight"
    tied = TaskVectors({alias: tv["bert.embeddings.word_embeddings.weight"]}, tv.expert_names)
    with pytest.raises(KeyError, match=re.escape(alias) + ".*tied"):
        MergedModel(bert.fresh(), tied)
    stranger = TaskVectors({"bert.no_such.weight": torch.zeros(2, 3)}, tv.expert_names)
    with pytest.raises(KeyError, match=r"bert\.no_such\.weight"):
        MergedModel(bert.fresh(), stranger)
    wrong = TaskVectors({"cls.predictions.bias": torch.zeros(2, 5)}, tv.expert_names)
    with pytest.raises(ValueError, match=r"shape mismatch for 'cls\.predictions\.bias'"):
        MergedModel(bert.fresh(), wrong)
    with pytest.raises(TypeError, match="nn.Module"):
        MergedModel(bert.pretrained.state_dict(), tv)


def test_layout_errors_through_merged_model(mlp):
    tv = TaskVectors.from_models(mlp.pretrained, mlp.experts)
    with pytest.raises(ValueError, match=r"'4\.weight'.*m=4 exceeds its first dimension \(3\)"):
        MergedModel(mlp.fresh(), tv, "chunk", chunks={"4.weight": 4})
    with pytest.raises(ValueError, match="unknown granularity 'rows'"):
        MergedModel(mlp.fresh(), tv, "rows")
    with pytest.raises(ValueError, match="unknown constraint 'softmax'"):
        MergedModel(mlp.fresh(), tv, constraint="softmax")


def test_backbone_frozen_only_coefficients_train(mlp):
    merged, _ = build(mlp, "layer")
    trainable = [n for n, p in merged.named_parameters() if p.requires_grad]
    assert trainable == ["coefficients.raw"]
    # the task vectors are buffers that are not saved with the module's state
    assert not any(k.startswith("vectors.") for k in merged.state_dict())


def test_merged_model_on_expert_pool_is_expert_at_one_hot(mlp):
    """A one-hot coefficient reproduces that expert exactly (up to float rounding)."""
    tv = TaskVectors.from_models(mlp.pretrained, mlp.experts)
    init = torch.tensor([[0.0], [1.0], [0.0]])
    merged = MergedModel(mlp.fresh(), tv, "task", init=init)
    with torch.no_grad():
        assert (mlp.run(merged) - mlp.run(mlp.experts["e1"])).abs().max() < 1e-5


def test_forward_with_swaps_extra_tensors(mlp):
    merged, _ = build(mlp, "layer", tv=TaskVectors.from_models(mlp.pretrained, mlp.experts, include=r"^[02]\."))
    head = perturbed(make_mlp(), seed=99)[4]
    params = dict(merged.merged_parameters())
    params["4.weight"], params["4.bias"] = head.weight, head.bias
    reference = mlp.fresh()
    reference.load_state_dict(merged.merged_state_dict())
    reference[4].load_state_dict(head.state_dict())
    with torch.no_grad():
        assert (merged.forward_with(params, *mlp.args) - reference(*mlp.args)).abs().max() < 1e-5


@pytest.mark.parametrize("offload", [True, False])
def test_offloaded_vectors_are_pinned_and_contiguous_where_a_gpu_is_present(monkeypatch, offload):
    """Pinned host memory is what makes the merge's block copies to the GPU asynchronous; this
    machine has no GPU, so its presence and the pinning are stood in for."""
    pinned = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self) or self)
    base = make_mlp()
    experts = {f"e{k}": perturbed(base, seed=k) for k in range(2)}
    tv = TaskVectors(
        {key: t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() == 3 else t for key, t in TaskVectors.from_models(base, experts).items()},
        ("e0", "e1"),
    )
    merged = MergedModel(copy.deepcopy(base), tv, "layer", offload_vectors=offload)
    buffers = list(merged.vectors.buffers())
    assert all(b.is_contiguous() for b in buffers)
    assert len(pinned) == (len(buffers) if offload else 0)
