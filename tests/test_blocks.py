"""How a model splits into stages, on a hand-made transformer-shaped model: its blocks are the
largest ModuleList of one class; the embeddings stage owns a tied head the last stage reads; one
block run on its own from the captured call equals that block inside the model; with every block
bypassed only what follows the blocks computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adamerge.core.scope import parameter_aliases
from adamerge.tasks import blocks as B


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, hidden, mask):
        return hidden + torch.tanh(self.fc(hidden)) * mask.unsqueeze(-1)


class Toy(nn.Module):
    """Embeddings, three blocks, a final norm and a head tied to the embeddings; a smaller list aside."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList(Block() for _ in range(3))
        self.adapters = nn.ModuleList([nn.Linear(1, 1)])  # a ModuleList too, but not the largest
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids, mask):
        hidden = self.embed(ids)
        for block in self.layers:
            hidden = block(hidden, mask=mask)
        return self.head(self.norm(hidden))


@pytest.fixture
def toy():
    torch.manual_seed(0)
    ids = torch.randint(0, 10, (2, 5))
    mask = torch.ones(2, 5)
    mask[1, -2:] = 0
    return Toy().eval(), ids, mask


def test_the_blocks_and_the_block_of_a_key(toy):
    model, _, _ = toy
    assert B.find_blocks(model) == "layers" and B.stage_count(model) == 3 + 2
    assert B.block_of_key("layers.2.fc.weight", "layers") == 2
    assert B.block_of_key("layers_norm.weight", "layers") is None and B.block_of_key("embed.weight", "layers") is None


def test_a_model_without_blocks_is_refused_clearly():
    with pytest.raises(ValueError, match="no nn.ModuleList of blocks"):
        B.find_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_stages_own_each_merged_tensor_once_and_the_tied_head_is_read_last(toy):
    model, ids, mask = toy
    keys = [n for n, _ in model.named_parameters() if not n.startswith("adapters")]
    stages = B.split_stages(model, keys, lambda: model(ids, mask), parameter_aliases(model))
    assert [(s.name, s.kind, s.index) for s in stages] == [
        ("embeddings", "pre", None), ("layers.0", "block", 0), ("layers.1", "block", 1), ("layers.2", "block", 2),
        ("head", "post", None)]
    assert stages[0].owns == ["embed.weight"] and stages[1].owns == ["layers.0.fc.weight", "layers.0.fc.bias"]
    assert stages[-1].reads == ["norm.weight", "norm.bias", "embed.weight"]  # the head is the embedding, read again
    assert stages[-1].owns == ["norm.weight", "norm.bias"]
    assert "adapters.0.weight" in stages[-1].needs  # never called, but held: kept as it is
    assert sorted(k for s in stages for k in s.owns) == sorted(keys)


def test_one_block_alone_equals_the_block_inside_the_model(toy):
    model, ids, mask = toy
    call = B.capture_block_input(model, "layers", lambda: model(ids, mask))
    assert torch.equal(call.hidden(), model.embed(ids)) and torch.equal(call.kwargs["mask"], mask)
    assert call.without_hidden().hidden() is None and not B.block_returns_tuple(model, "layers", call)
    params = {f"layers.1.{k}": v + 0.5 for k, v in model.layers[1].state_dict().items()}  # other weights, swapped in
    hidden = torch.randn(2, 5, 4)
    expected = hidden + torch.tanh(hidden @ params["layers.1.fc.weight"].T + params["layers.1.fc.bias"]) * mask.unsqueeze(-1)
    torch.testing.assert_close(B.run_block(model, "layers", 1, params, call.without_hidden(), hidden), expected)


def test_with_the_blocks_bypassed_only_what_follows_them_computes(toy):
    model, ids, mask = toy
    features = torch.randn(2, 5, 4)
    with B.blocks_bypassed(model, "layers", features, as_tuple=False):
        logits = model(ids, mask)
    torch.testing.assert_close(logits, model.head(model.norm(features)))
    assert all(isinstance(b, Block) for b in model.layers)  # the blocks are back
