"""How the benchmark zoos fine-tune an expert: AdamW without decay on biases and norms, linear
warmup then linear decay to zero, gradients clipped at 1, one progress bar; and how a finished
expert is saved (its metadata last, which marks it finished: see :mod:`benchmarks.zoos.cache`)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from adamerge.io.checkpoints import write_text
from adamerge.tasks.hf import quiet_transformers
from benchmarks.zoos.cache import EXPERT_META


def adamw_with_warmup(model: nn.Module, lr: float, weight_decay: float, warmup: int, total: int,
                      no_decay: Sequence[str]) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over every parameter (no weight decay on names ending in ``no_decay``) and a schedule
    rising linearly over ``warmup`` steps, then falling linearly to zero at step ``total``."""
    suffixes = tuple(no_decay)
    decay = [p for n, p in model.named_parameters() if not n.endswith(suffixes)]
    other = [p for n, p in model.named_parameters() if n.endswith(suffixes)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}], lr=lr
    )

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def train_steps(model: nn.Module, batches: Iterator[Mapping[str, torch.Tensor]], total: int,
                optimizer: torch.optim.Optimizer, scheduler, *, desc: str, progress: bool = True) -> tuple[list[float], float]:
    """``total`` optimiser steps on the model's own loss, one batch each from ``batches``; returns
    the loss of every step and the seconds spent."""
    from tqdm.auto import tqdm

    model.train()
    losses: list[float] = []
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, mininterval=5.0, file=sys.stderr,
               dynamic_ncols=True)
    started = time.perf_counter()
    for _, batch in zip(range(total), batches):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    model.eval()
    return losses, time.perf_counter() - started


def save_expert(staging: Path, model: nn.Module, tokenizer, info: dict, started: float) -> None:
    """Weights, tokenizer, then ``adamerge_expert.json`` (with the seconds since ``started``) last."""
    with quiet_transformers():
        model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    info["seconds"] = time.perf_counter() - started
    write_text(staging / EXPERT_META, json.dumps(info, indent=1) + "\n")
