"""How a model splits into blocks, and how one block runs on its own, for block-by-block learning.

A model's *stages*, in order: ``pre`` (everything before the first transformer block: the
embeddings), one stage per block, and ``post`` (everything after the last block: final norm,
pooler, the task's head). The blocks are found from the model's structure: its largest
``nn.ModuleList`` of identical modules (BERT-style ``encoder.layer``, GPT-2's ``h``,
Llama-style ``model.layers``); which tensors the ``pre`` and ``post`` stages read is recorded
by running the model once, so tied tensors (an LM head tied to the embeddings) are read by
both and owned by the first.

Supported: encoders and decoders whose blocks are called once each, in order, with the hidden
states as their first argument (or ``hidden_states=``) and every other argument (attention
masks, rotary position embeddings) independent of the merged weights — BERT/RoBERTa-style
encoders, GPT-2 and Llama-style decoders among them. Inputs to block 0 are captured with a
forward pre-hook; the ``post`` stage runs the whole forward with every block replaced by a
pass-through that returns the cached features, so only what follows the blocks computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor, nn
from torch.func import functional_call

from adamerge.core.granularities import module_of


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted activations are captured."""


@dataclass
class Stage:
    """One stage: the merged tensors it reads, and those it owns (reads first, so learns)."""

    name: str
    kind: Literal["pre", "block", "post"]
    reads: list[str]
    owns: list[str]
    index: int | None = None  # the block's position, for kind 'block'
    needs: list[str] = field(default_factory=list)  # every tensor its modules hold (merged or not)


@dataclass
class BlockCall:
    """The arguments one block is called with, hidden states aside (same for every block)."""

    args: tuple
    kwargs: dict[str, Any]
    hidden_in_kwargs: bool

    def hidden(self) -> Tensor:
        return self.kwargs["hidden_states"] if self.hidden_in_kwargs else self.args[0]

    def without_hidden(self) -> "BlockCall":
        """The same call with its hidden states dropped (``with_hidden`` supplies them): kept for a
        whole run, it would otherwise hold every batch's embeddings, ``rows·tokens·hidden`` each."""
        if self.hidden_in_kwargs:
            return BlockCall(self.args, {**self.kwargs, "hidden_states": None}, True)
        return BlockCall((None, *self.args[1:]), self.kwargs, False)

    def with_hidden(self, hidden: Tensor) -> tuple[tuple, dict]:
        if self.hidden_in_kwargs:
            return self.args, {**self.kwargs, "hidden_states": hidden}
        return (hidden, *self.args[1:]), self.kwargs


def find_blocks(model: nn.Module) -> str:
    """The path of the model's transformer blocks: its largest ModuleList of modules of one class."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 1 and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = name, size
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of blocks: block-by-block learning needs a "
            "transformer-style model (BERT-style encoders, GPT-2, Llama-style decoders)"
        )
    return best


def stage_count(model: nn.Module) -> int:
    """How many stages the model splits into: the embeddings, each block, the head."""
    return len(model.get_submodule(find_blocks(model))) + 2


def block_of_key(key: str, prefix: str) -> int | None:
    """The block index of a tensor under ``prefix`` (``prefix.3.attn.weight`` → 3), else None."""
    if not key.startswith(prefix + "."):
        return None
    return int(key[len(prefix) + 1 :].split(".", 1)[0])


def split_stages(
    model: nn.Module, keys: Sequence[str], run: Callable[[], Any], aliases: Mapping[str, str] | None = None,
    as_tuple: bool = False,
) -> list[Stage]:
    """The model's stages over the merged ``keys``; ``run()`` makes one forward pass, here with
    every block a pass-through (so only what lies outside the blocks must hold real weights), to
    see which modules are called before and after the blocks. ``aliases`` maps tied names to
    canonical keys; ``as_tuple``: whether blocks return tuples. Each stage also lists every tensor
    its modules hold (``needs``: what a streamed run reads for it)."""
    prefix = find_blocks(model)
    blocks = model.get_submodule(prefix)
    aliases = dict(aliases or {})
    held: dict[str, list[str]] = {}  # module outside the blocks -> the (canonical) tensors it holds
    for name in model.state_dict(keep_vars=True):
        if block_of_key(name, prefix) is None:
            held.setdefault(module_of(name), []).append(aliases.get(name, name))
    phase = {"now": "pre"}
    called: dict[str, list[str]] = {"pre": [], "post": []}

    def record(name):
        def hook(module, args):
            if phase["now"] in called:
                called[phase["now"]].append(name)

        return hook

    handles = []
    for name in held:
        with contextlib.suppress(AttributeError):
            handles.append(model.get_submodule(name).register_forward_pre_hook(record(name)))
    last = len(blocks) - 1
    try:
        with _blocks_replaced(model, prefix, lambda index: _Identity(as_tuple, phase, index == 0, index == last)):
            run()
    finally:
        for handle in handles:
            handle.remove()
    needs = {when: list(dict.fromkeys(k for name in called[when] for k in held[name])) for when in called}
    outside = list(dict.fromkeys(k for names in held.values() for k in names))
    needs["post"] += [k for k in outside if k not in needs["pre"] and k not in needs["post"]]  # never called: kept as they are
    merged = set(keys)
    pre = [k for k in needs["pre"] if k in merged]
    post = [k for k in needs["post"] if k in merged]
    stages = [Stage("embeddings", "pre", pre, pre, needs=needs["pre"])]
    for index in range(len(blocks)):
        own = [k for k in keys if block_of_key(k, prefix) == index]
        inside = [aliases.get(n, n) for n in model.state_dict(keep_vars=True) if block_of_key(n, prefix) == index]
        stages.append(Stage(f"{prefix}.{index}", "block", own, own, index, needs=list(dict.fromkeys(inside))))
    stages.append(Stage("head", "post", post, [k for k in post if k not in pre], needs=needs["post"]))
    return stages


class _Identity(nn.Module):
    """Stands in for a block while stages are found: returns its input, moving the phase on."""

    def __init__(self, as_tuple: bool, phase: dict, first: bool, last: bool):
        super().__init__()
        self.as_tuple, self.phase, self.first, self.last = as_tuple, phase, first, last

    def forward(self, *args, **kwargs):
        if self.first:
            self.phase["now"] = "blocks"
        if self.last:
            self.phase["now"] = "post"  # what runs after this returns follows the blocks
        hidden = kwargs["hidden_states"] if not args else args[0]
        return (hidden,) if self.as_tuple else hidden


def capture_block_input(model: nn.Module, prefix: str, run: Callable[[], Any]) -> BlockCall:
    """The arguments block 0 receives during ``run()``; the forward stops there."""
    block = model.get_submodule(prefix)[0]
    captured: dict[str, BlockCall] = {}

    def hook(module, args, kwargs):
        captured["call"] = BlockCall(tuple(args), dict(kwargs), hidden_in_kwargs=not args)
        raise StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    except StopForward:
        pass
    finally:
        handle.remove()
    if "call" not in captured:
        raise RuntimeError(f"the forward pass never reached block {prefix}.0")
    return captured["call"]


def run_block(model: nn.Module, prefix: str, index: int, params: Mapping[str, Tensor], call: BlockCall, hidden: Tensor) -> Tensor:
    """Block ``index`` alone, with the given tensors (full names) swapped in, on ``hidden``."""
    block = model.get_submodule(prefix)[index]
    start = f"{prefix}.{index}."
    local = {k[len(start) :]: v for k, v in params.items() if k.startswith(start)}
    args, kwargs = call.with_hidden(hidden)
    out = functional_call(block, local, args, kwargs, strict=False)
    return out[0] if isinstance(out, tuple) else out


class _PassThrough(nn.Module):
    """Stands in for a block: returns the cached features, in the block's own output format."""

    def __init__(self, features: Tensor, as_tuple: bool):
        super().__init__()
        self.features, self.as_tuple = features, as_tuple

    def forward(self, *args, **kwargs):
        return (self.features,) if self.as_tuple else self.features


@contextlib.contextmanager
def _blocks_replaced(model: nn.Module, prefix: str, make: Callable[[int], nn.Module]) -> Iterator[None]:
    """Within the context block ``i`` is ``make(i)``; the originals come back after."""
    blocks = model.get_submodule(prefix)
    originals = list(blocks)
    try:
        for index in range(len(blocks)):
            blocks[index] = make(index)
        yield
    finally:
        for index, module in enumerate(originals):
            blocks[index] = module


def blocks_bypassed(model: nn.Module, prefix: str, features: Tensor, as_tuple: bool):
    """Within the context every block returns ``features``: a forward computes only what
    precedes and follows the blocks (what precedes is ignored)."""
    return _blocks_replaced(model, prefix, lambda index: _PassThrough(features, as_tuple))


def block_returns_tuple(model: nn.Module, prefix: str, call: BlockCall) -> bool:
    """Whether the model's blocks return a tuple (older HF layers) or a tensor."""
    block = model.get_submodule(prefix)[0]
    args, kwargs = call.with_hidden(call.hidden())
    return isinstance(block(*args, **kwargs), tuple)
