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
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn
from torch.func import functional_call

from adamerge.coefficients import module_of


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


@dataclass
class BlockCall:
    """The arguments one block is called with, hidden states aside (same for every block)."""

    args: tuple
    kwargs: dict[str, Any]
    hidden_in_kwargs: bool

    def hidden(self) -> Tensor:
        return self.kwargs["hidden_states"] if self.hidden_in_kwargs else self.args[0]

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


def block_of_key(key: str, prefix: str) -> int | None:
    """The block index of a tensor under ``prefix`` (``prefix.3.attn.weight`` → 3), else None."""
    if not key.startswith(prefix + "."):
        return None
    return int(key[len(prefix) + 1 :].split(".", 1)[0])


def split_stages(
    model: nn.Module, keys: Sequence[str], run: Callable[[], Any], aliases: Mapping[str, str] | None = None
) -> list[Stage]:
    """The model's stages over the merged ``keys``; ``run()`` makes one forward pass (to see which
    modules are called before and after the blocks). ``aliases`` maps tied names to canonical keys."""
    prefix = find_blocks(model)
    blocks = model.get_submodule(prefix)
    owners: dict[str, list[str]] = {}
    for key in keys:
        if block_of_key(key, prefix) is None:
            owners.setdefault(module_of(key), []).append(key)
    for alias, canonical in (aliases or {}).items():  # a tied head reads the embedding's tensor
        if canonical in keys and block_of_key(alias, prefix) is None:
            owners.setdefault(module_of(alias), []).append(canonical)
    phase = {"now": "pre"}
    reads: dict[str, list[str]] = {"pre": [], "post": []}
    handles = []

    def record(name):
        def hook(module, args):
            if phase["now"] in reads:
                reads[phase["now"]].extend(owners[name])

        return hook

    for name in owners:
        with contextlib.suppress(AttributeError):
            handles.append(model.get_submodule(name).register_forward_pre_hook(record(name)))
    handles.append(blocks[0].register_forward_pre_hook(lambda m, a: phase.update(now="blocks")))
    handles.append(blocks[len(blocks) - 1].register_forward_hook(lambda m, a, o: phase.update(now="post")))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    pre = list(dict.fromkeys(reads["pre"]))
    post = list(dict.fromkeys(reads["post"]))
    unread = [k for k in keys if block_of_key(k, prefix) is None and k not in pre and k not in post]
    post += unread  # never called in the forward: nothing to learn, kept at their start
    stages = [Stage("embeddings", "pre", pre, pre)]
    for index in range(len(blocks)):
        own = [k for k in keys if block_of_key(k, prefix) == index]
        stages.append(Stage(f"{prefix}.{index}", "block", own, own, index))
    stages.append(Stage("head", "post", post, [k for k in post if k not in pre]))
    return stages


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
def blocks_bypassed(model: nn.Module, prefix: str, features: Tensor, as_tuple: bool) -> Iterator[None]:
    """Within the context every block returns ``features``: a forward computes only what
    precedes and follows the blocks (what precedes is ignored)."""
    blocks = model.get_submodule(prefix)
    originals = list(blocks)
    try:
        for index in range(len(blocks)):
            blocks[index] = _PassThrough(features, as_tuple)
        yield
    finally:
        for index, module in enumerate(originals):
            blocks[index] = module


def block_returns_tuple(model: nn.Module, prefix: str, call: BlockCall) -> bool:
    """Whether the model's blocks return a tuple (older HF layers) or a tensor."""
    block = model.get_submodule(prefix)[0]
    args, kwargs = call.with_hidden(call.hidden())
    return isinstance(block(*args, **kwargs), tuple)
