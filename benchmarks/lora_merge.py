"""LoRA experts merged from their factors against the same experts materialised: task-vector
memory, peak memory of learning and step time as the number of experts K grows.

    python benchmarks/lora_merge.py [--experts 2 4 8 16] [--rank 16] [--steps 3] [--out runs/lora-merge]

A Llama-style model (``LlamaConfig``: hidden 1024, intermediate 2816, 4 layers, 53 M parameters)
and K PEFT LoRA adapters (rank ``r`` on every attention and MLP projection, seeded noise in both
factors) written by peft. Each configuration runs in a fresh process: task vectors from the
adapter folders (``TaskVectors.from_models``, ``low_rank=True`` or ``False``), a layer-wise
:class:`~adamerge.core.merged.MergedModel`, then ``--steps`` Adam steps on the merged model's
logits (one merge, one forward and backward per step).

- "τ MiB" is ``TaskVectors.nbytes()``; "predicted" is ``Σ_matrices K·r·(m+n)·4`` bytes for the
  factored vectors plus ``K·numel·4`` for the vectors left dense (norms), and ``K·|θ|·4`` for the
  materialised ones.
- "peak +" is the growth of peak RSS (``VmHWM``) over the RSS once the libraries and the
  pretrained model are loaded: task vectors, merged weights, gradients and activations.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import in_fresh_process, reset_peak_rss, rss_mb  # noqa: E402

HIDDEN, INTERMEDIATE, LAYERS, VOCAB, HEADS = 1024, 2816, 4, 2048, 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, num_key_value_heads=HEADS, tie_word_embeddings=False)


def make_models(folder: Path, experts: int, rank: int) -> None:
    """The pretrained model (safetensors) and ``experts`` LoRA adapters over it."""
    import peft
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(config()).eval()
    base.save_pretrained(folder / "base")
    for k in range(experts):
        torch.manual_seed(100 + k)
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(0.02 * torch.randn_like(param))
        model.save_pretrained(folder / f"e{k}")


def predicted_mb(pretrained, experts: int, rank: int, low_rank: bool) -> float:
    total = 0
    for name, param in pretrained.named_parameters():
        adapted = any(f".{target}." in name for target in TARGETS)
        if low_rank and param.dim() == 2:
            total += experts * rank * sum(param.shape) if adapted else 0
        else:
            total += experts * param.numel()
    return total * 4 / 2**20


def run(folder: Path, experts: int, rank: int, low_rank: bool, steps: int) -> dict:
    from transformers import LlamaForCausalLM

    from adamerge.core.merged import MergedModel
    from adamerge.core.task_vectors import TaskVectors

    torch.set_num_threads(2)
    pretrained = LlamaForCausalLM.from_pretrained(folder / "base").eval()
    ids = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(0))
    pretrained(input_ids=ids[:1]).logits.sum()  # warm up the kernels outside the peak
    baseline = reset_peak_rss()
    started = time.perf_counter()
    vectors = TaskVectors.from_models(pretrained, {f"e{k}": str(folder / f"e{k}") for k in range(experts)}, low_rank=low_rank)
    merged = MergedModel(pretrained, vectors, "layer", init=0.3)
    built = time.perf_counter() - started
    optimizer = torch.optim.Adam(merged.coefficients.parameters(), lr=1e-2)
    started = time.perf_counter()
    for _ in range(steps):
        loss = merged(input_ids=ids).logits.log_softmax(-1).max(-1).values.mean().neg()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {
        "tau_mb": vectors.nbytes() / 2**20, "predicted_mb": predicted_mb(pretrained, experts, rank, low_rank),
        "peak_mb": rss_mb("VmHWM") - baseline, "build_s": built, "step_s": (time.perf_counter() - started) / steps,
    }


def main(argv: list[str] | None = None) -> int:
    if argv and argv[0] == "--child":
        folder, experts, rank, low_rank, steps = argv[1:]
        print(json.dumps(run(Path(folder), int(experts), int(rank), low_rank == "1", int(steps))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/lora-merge"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.out) as folder:
        make_models(Path(folder), max(args.experts), args.rank)
        for experts in args.experts:
            row = {"experts": experts}
            for label, flag in (("low_rank", "1"), ("dense", "0")):
                row[label] = in_fresh_process(__file__, folder, str(experts), str(args.rank), flag, str(args.steps))
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [
        f"Llama-style model, hidden {HIDDEN}, {LAYERS} layers; K LoRA experts of rank {args.rank} on {', '.join(TARGETS)}; "
        f"layer-wise coefficients, {args.steps} Adam steps of batch 4 x 64 tokens; MiB, fresh process each.",
        "",
        "| K | τ factored (predicted) | τ dense (predicted) | peak + factored | peak + dense | step s factored | step s dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        low, dense = row["low_rank"], row["dense"]
        lines.append(
            f"| {row['experts']} | {low['tau_mb']:.1f} ({low['predicted_mb']:.1f}) | {dense['tau_mb']:.0f} ({dense['predicted_mb']:.0f}) | "
            f"{low['peak_mb']:.0f} | {dense['peak_mb']:.0f} | {low['step_s']:.2f} | {dense['step_s']:.2f} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps({"rank": args.rank, "rows": rows}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
