"""Coefficient layouts, initialisation, transfer and persistence (constraints: test_constraints.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from adamerge import MergeCoefficients, MergedModel, Sigmoid, TaskVectors, build_layout
from adamerge.io.checkpoints import save_safetensors
from adamerge.core.layouts import CoefficientLayout, chunk_sizes

EXPERTS = ("a", "b")
SHAPES = {
    "emb.weight": (10, 4),
    "layers.0.w": (6, 4),
    "layers.0.b": (6,),
    "layers.1.w": (6, 4),
    "head.w": (3, 4),
}


def slot_names_of(layout: CoefficientLayout, key: str) -> list[str]:
    return [layout.slot_names[s] for s in layout.tensor_slots[key]]


# ---------------------------------------------------------------------- layouts


def test_task_and_layer_layouts():
    task = build_layout(EXPERTS, SHAPES, "task")
    assert task.slot_names == ("all",)
    assert all(slots == (0,) for slots in task.tensor_slots.values())
    layer = build_layout(EXPERTS, SHAPES, "layer")
    assert layer.slot_names == tuple(SHAPES)
    assert [layer.tensor_slots[k] for k in SHAPES] == [(i,) for i in range(5)]
    assert layer.rows == {"emb.weight": 10, "layers.0.w": 6, "layers.0.b": 6, "layers.1.w": 6, "head.w": 3}
    assert layer.numels["emb.weight"] == 40 and layer.num_experts == 2


def test_group_layouts():
    block = build_layout(EXPERTS, SHAPES, "group", groups="block")
    assert block.slot_names == ("emb", "layers.0", "layers.1", "head")
    assert block.tensor_slots["layers.0.w"] == block.tensor_slots["layers.0.b"] == (1,)
    regex = build_layout(EXPERTS, SHAPES, "group", groups={"body": r"^layers\.", "top": "head"})
    assert {k: slot_names_of(regex, k)[0] for k in SHAPES} == {
        "emb.weight": "other",
        "layers.0.w": "body",
        "layers.0.b": "body",
        "layers.1.w": "body",
        "head.w": "top",
    }
    listed = build_layout(EXPERTS, SHAPES, "group", groups=[r"\.0\.", r"layers"])
    assert slot_names_of(listed, "layers.0.b") == [r"\.0\."]  # the first matching regex wins
    assert slot_names_of(listed, "layers.1.w") == ["layers"]
    assert slot_names_of(listed, "head.w") == ["other"]


def test_chunk_layout_from_map():
    layout = build_layout(EXPERTS, SHAPES, "chunk", chunks={"emb.weight": 3, r"layers\.\d+\.w": 2, "head.w": 0})
    assert slot_names_of(layout, "emb.weight") == ["emb.weight[0/3]", "emb.weight[1/3]", "emb.weight[2/3]"]
    assert slot_names_of(layout, "layers.1.w") == ["layers.1.w[0/2]", "layers.1.w[1/2]"]
    assert slot_names_of(layout, "layers.0.b") == ["layers.0.b"]  # unlisted: m = 1
    assert slot_names_of(layout, "head.w") == ["head.w (frozen)"]
    assert layout.frozen_slots == [layout.slot_names.index("head.w (frozen)")]
    assert layout.num_slots == 3 + 2 + 1 + 2 + 1
    everything = build_layout(EXPERTS, SHAPES, "chunk", chunks=3)
    assert all(len(s) == 3 for s in everything.tensor_slots.values())


def test_row_values_follow_uneven_chunks():
    layout = build_layout(("a",), {"w": (7, 2)}, "chunk", chunks={"w": 3})
    coefficients = MergeCoefficients(layout, init=torch.tensor([[1.0, 2.0, 3.0]]))
    assert coefficients.row_values("w").tolist() == [[1.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]]


@pytest.mark.parametrize("rows,m", [(7, 3), (10, 4), (6, 6), (5, 1), (100, 3), (16, 5)])
def test_chunk_sizes_match_tensor_split(rows, m):
    sizes = chunk_sizes(rows, m)
    assert sizes == [len(part) for part in torch.arange(rows).tensor_split(m)]
    assert sum(sizes) == rows


def test_freeze_patterns():
    layout = build_layout(EXPERTS, SHAPES, "task", freeze=[r"^emb", "head"])
    assert slot_names_of(layout, "emb.weight") == ["emb.weight (frozen)"]
    assert slot_names_of(layout, "layers.0.w") == ["all"]
    assert len(layout.frozen) == 2 and layout.trainable_slots == [layout.slot_names.index("all")]


def test_layout_errors():
    with pytest.raises(ValueError, match=r"'head\.w'.*m=4 exceeds its first dimension \(3\)"):
        build_layout(EXPERTS, SHAPES, "chunk", chunks={"head.w": 4})
    with pytest.raises(ValueError, match=r"m=4 exceeds"):
        build_layout(EXPERTS, SHAPES, "chunk", chunks=4)
    with pytest.raises(ValueError, match=r"unknown granularity 'neuron'; use one of \['chunk', 'element', 'group', 'layer', 'spectral', 'task'\]"):
        build_layout(EXPERTS, SHAPES, "neuron")
    with pytest.raises(ValueError, match="'groups' is only used with granularity 'group'"):
        build_layout(EXPERTS, SHAPES, "layer", groups="block")
    with pytest.raises(ValueError, match="'chunks' is only used with granularity 'chunk'"):
        build_layout(EXPERTS, SHAPES, "layer", chunks=2)
    with pytest.raises(ValueError, match="unknown groups 'blocks'"):
        build_layout(EXPERTS, SHAPES, "group", groups="blocks")
    with pytest.raises(ValueError, match=">= 0, got -1"):
        build_layout(EXPERTS, SHAPES, "chunk", chunks={"emb.weight": -1})
    with pytest.raises(ValueError, match=">= 0, got -2"):
        build_layout(EXPERTS, SHAPES, "chunk", chunks=-2)


def test_layout_json_round_trip():
    layout = build_layout(EXPERTS, SHAPES, "chunk", chunks={"emb.weight": 3, "head.w": 0}, freeze="layers.1")
    assert CoefficientLayout.from_json(layout.to_json()) == layout


# ---------------------------------------------------------------------- initialisation


def test_init_scalar_list_dict_tensor():
    layout = build_layout(EXPERTS, SHAPES, "layer")
    assert torch.equal(MergeCoefficients(layout, init=0.25)(), torch.full((2, 5), 0.25))
    listed = MergeCoefficients(layout, init=[0.1, 0.9])()
    assert torch.equal(listed, torch.tensor([[0.1] * 5, [0.9] * 5]))
    named = MergeCoefficients(layout, init={"b": 0.9, "a": 0.1})()  # order of the dict does not matter
    assert torch.equal(named, listed)
    table = torch.arange(10.0).view(2, 5)
    assert torch.equal(MergeCoefficients(layout, init=table)(), table)


def test_init_errors_name_the_problem():
    layout = build_layout(EXPERTS, SHAPES, "layer")
    with pytest.raises(ValueError, match=r"unknown \['c'\], missing \[\]"):
        MergeCoefficients(layout, init={"a": 0.1, "b": 0.2, "c": 0.3})
    with pytest.raises(ValueError, match=r"unknown \[\], missing \['b'\]"):
        MergeCoefficients(layout, init={"a": 0.1})
    with pytest.raises(ValueError, match=r"init has 3 values but there are 2 experts \['a', 'b'\]"):
        MergeCoefficients(layout, init=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"shape \(2, 4\), expected \(experts, slots\) = \(2, 5\)"):
        MergeCoefficients(layout, init=torch.zeros(2, 4))


def test_frozen_slots_keep_their_value():
    layout = build_layout(EXPERTS, SHAPES, "chunk", chunks={"emb.weight": 2, "head.w": 0})
    init = torch.rand(2, layout.num_slots)
    coefficients = MergeCoefficients(layout, init=init)
    frozen = layout.frozen_slots
    assert coefficients.raw.shape == (2, layout.num_slots - len(frozen))
    optimizer = torch.optim.SGD(coefficients.parameters(), lr=1.0)
    coefficients().sum().backward()
    optimizer.step()
    values = coefficients().detach()
    assert torch.equal(values[:, frozen], init[:, frozen])
    trainable = layout.trainable_slots
    assert torch.allclose(values[:, trainable], init[:, trainable] - 1.0)


def test_transfer_task_to_layer_and_layer_to_chunk():
    task = MergeCoefficients(build_layout(EXPERTS, SHAPES, "task"), init=[0.2, 0.6])
    layer = MergeCoefficients(build_layout(EXPERTS, SHAPES, "layer"), init=task)
    assert torch.equal(layer(), torch.tensor([[0.2] * 5, [0.6] * 5]))
    with torch.no_grad():
        layer.raw.copy_(torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [1.0, 2.0, 3.0, 4.0, 5.0]]))
    chunk_layout = build_layout(EXPERTS, SHAPES, "chunk", chunks={"emb.weight": 3, "layers.1.w": 2})
    chunk = MergeCoefficients(chunk_layout, init=layer)
    # each chunk covers entries of one tensor only: its mean is that tensor's layer value
    expected = {"emb.weight": 0.1, "layers.0.w": 0.2, "layers.0.b": 0.3, "layers.1.w": 0.4, "head.w": 0.5}
    values = chunk().detach()
    for key, value in expected.items():
        for slot in chunk_layout.tensor_slots[key]:
            assert values[0, slot].item() == pytest.approx(value, abs=1e-7)
            assert values[1, slot].item() == pytest.approx(value * 10, abs=1e-6)


def test_transfer_takes_element_weighted_means():
    shapes = {"w": (5, 2), "b": (5,)}
    chunked = build_layout(("a",), shapes, "chunk", chunks={"w": 2})  # w rows 3 + 2, 2 entries per row
    names = chunked.slot_names
    init = torch.zeros(1, chunked.num_slots)
    init[0, names.index("w[0/2]")], init[0, names.index("w[1/2]")], init[0, names.index("b")] = 0.1, 0.4, 0.7
    previous = MergeCoefficients(chunked, init=init)
    layer = MergeCoefficients(build_layout(("a",), shapes, "layer"), init=previous)
    # w: (6 entries × 0.1 + 4 entries × 0.4) / 10 = 0.22; b keeps 0.7
    assert layer().detach()[0].tolist() == pytest.approx([0.22, 0.7], abs=1e-7)
    task = MergeCoefficients(build_layout(("a",), shapes, "task"), init=previous)
    # (0.6 + 1.6 + 5 × 0.7) / 15 = 0.38
    assert task().item() == pytest.approx(0.38, abs=1e-7)
    # chunk → finer chunk: 6 rows as 2 chunks (a, a, a | b, b, b) → 3 chunks (a, a | a, b | b, b)
    two = build_layout(("a",), {"w": (6, 3)}, "chunk", chunks=2)
    three = build_layout(("a",), {"w": (6, 3)}, "chunk", chunks=3)
    moved = MergeCoefficients(three, init=MergeCoefficients(two, init=torch.tensor([[1.0, 4.0]])))
    assert moved().detach()[0].tolist() == pytest.approx([1.0, 2.5, 4.0])


def test_transfer_errors():
    previous = MergeCoefficients(build_layout(EXPERTS, SHAPES, "layer"))
    with pytest.raises(ValueError, match=r"init coefficients are for experts \['a', 'b'\], this merge has \['a', 'c'\]"):
        MergeCoefficients(build_layout(("a", "c"), SHAPES, "layer"), init=previous)
    with pytest.raises(ValueError, match=r"do not cover tensor 'extra\.w'"):
        MergeCoefficients(build_layout(EXPERTS, {**SHAPES, "extra.w": (2,)}, "layer"), init=previous)


# ---------------------------------------------------------------------- persistence


def test_save_load_round_trip(tmp_path):
    layout = build_layout(EXPERTS, SHAPES, "chunk", chunks={"emb.weight": 3, "head.w": 0})
    coefficients = MergeCoefficients(layout, init={"a": 1e-3, "b": 0.7}, constraint="sigmoid")
    optimizer = torch.optim.Adam(coefficients.parameters(), lr=0.05)
    (coefficients() * torch.randn(2, layout.num_slots)).sum().backward()
    optimizer.step()
    path = tmp_path / "coefficients.safetensors"
    coefficients.save(path)
    loaded = MergeCoefficients.load(path)
    assert loaded.layout == layout
    assert isinstance(loaded.constraint, Sigmoid)
    assert torch.equal(loaded.raw, coefficients.raw)
    assert torch.equal(loaded(), coefficients())
    assert torch.equal(loaded.initial, coefficients.initial)
    readable = json.loads((tmp_path / "coefficients.json").read_text())
    assert readable["granularity"] == "chunk"
    assert readable["constraint"]["name"] == "sigmoid"
    assert readable["coefficients"] == coefficients.as_dict()
    assert len(readable["coefficients"]["a"]["emb.weight"]) == 3
    assert readable["coefficients"]["b"]["head.w"] == 0.7  # frozen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coefficients.json", "coefficients.safetensors"]


@pytest.mark.parametrize("constraint", [None, "clamp", "sigmoid"])
def test_saved_coefficients_reproduce_the_merge_exactly(tmp_path, mlp, constraint):
    tv = TaskVectors.from_models(mlp.pretrained, mlp.experts)
    merged = MergedModel(mlp.fresh(), tv, "chunk", init=0.3, constraint=constraint, chunks=mlp.chunks)
    optimizer = torch.optim.Adam(merged.coefficients.parameters(), lr=0.05)
    for _ in range(2):
        mlp.run(merged).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        merged.coefficients.project_()
    path = tmp_path / "run" / "coefficients.safetensors"
    merged.coefficients.save(path)
    restored = MergedModel(mlp.fresh(), tv, "chunk", init=str(path), constraint=constraint, chunks=mlp.chunks)
    assert torch.equal(restored.coefficients(), merged.coefficients())
    with torch.no_grad():
        assert torch.equal(mlp.run(restored), mlp.run(merged))
    loaded = MergeCoefficients.load(path)
    assert torch.equal(loaded(), merged.coefficients())


def test_load_rejects_other_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_safetensors({"values": torch.zeros(2, 2)}, plain)
    with pytest.raises(ValueError, match="is not an adamerge coefficient file"):
        MergeCoefficients.load(plain)
    vectors = tmp_path / "tv.safetensors"
    TaskVectors({"w": torch.zeros(2, 3)}, ["a", "b"]).save(vectors)
    with pytest.raises(ValueError, match="is not an adamerge coefficient file"):
        MergeCoefficients.load(vectors)


def test_as_dict_is_readable():
    layout = build_layout(EXPERTS, {"w": (4, 2), "b": (4,)}, "chunk", chunks={"w": 2})
    coefficients = MergeCoefficients(layout, init=torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]))
    assert coefficients.as_dict() == {"a": {"w": [0.1, 0.2], "b": 0.3}, "b": {"w": [0.4, 0.5], "b": 0.6}}
    assert math.isclose(coefficients.as_dict()["b"]["b"], 0.6)


# ---------------------------------------------------------------------- dtype


def test_coefficients_keep_float32_and_their_values_when_the_model_is_cast(mlp):
    tv = TaskVectors.from_models(mlp.pretrained, mlp.experts)
    merged = MergedModel(mlp.fresh(), tv, "chunk", init=0.3, constraint="sigmoid", chunks=mlp.chunks)
    coefficients = merged.coefficients
    assert (coefficients.raw.detach().to(torch.bfloat16).float() != coefficients.raw).any()  # not bf16 numbers
    coefficients.raw.grad = torch.full_like(coefficients.raw, 1 / 3)
    before = {name: tensor.clone() for name, tensor in coefficients.state_dict().items()}
    merged.to(torch.bfloat16)
    assert merged.backbone[0].weight.dtype == torch.bfloat16  # the rest of the model is cast
    merged.half()
    assert merged.backbone[0].weight.dtype == torch.float16
    for name, tensor in coefficients.state_dict().items():
        assert tensor.dtype == before[name].dtype and torch.equal(tensor, before[name]), name
    assert coefficients.raw.dtype == coefficients.raw.grad.dtype == torch.float32
    # a move to another device with a dtype moves the float32 tensors ("meta" stands in for an accelerator)
    coefficients.to("meta", torch.bfloat16)
    assert {(t.device.type, t.dtype) for t in (coefficients.raw, coefficients.residual, coefficients.initial)} == {
        ("meta", torch.float32)
    }
