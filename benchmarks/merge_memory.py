"""Peak memory of a data-free merge as the number of experts K grows: flat, since a merge reads
one tensor of the K experts at a time.

    python benchmarks/merge_memory.py [--experts 4 8] [--method task_arithmetic] [--layers 12] [--out runs/merge-memory]

A Llama-style model (``LlamaConfig``: hidden 512, intermediate 1408, 12 layers, vocabulary 4096,
untied head: 43 M parameters, 172 MB in float32) and K experts (seeded noise on every tensor),
all saved by ``save_pretrained`` as safetensors. Each configuration runs in a fresh process, as
``adamerge merge`` runs a method: the pretrained model loaded (``from_pretrained``), the experts
given as their folders, then the method called. "peak +" is the growth of peak RSS (``VmHWM``)
over the RSS once the libraries and the pretrained model are loaded (and paged in: transformers
maps it from its file).

Predicted: the merged copy of the model (``|θ|`` in its dtype) plus one key's float32 stack and
the method's work on it, ``≈ (K + 2) × 4 ×`` the largest tensor (the embedding table, 8 MB here),
so K = 8 should stay within 1.2 × K = 4; holding every task vector instead costs ``K·|θ|·4`` bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import in_fresh_process, reset_peak_rss, rss_mb  # noqa: E402

HIDDEN, INTERMEDIATE, VOCAB, HEADS = 512, 1408, 4096, 8


def config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                       num_attention_heads=HEADS, num_key_value_heads=HEADS, tie_word_embeddings=False)


def make_models(folder: Path, experts: int, layers: int) -> None:
    """The pretrained model and ``experts`` experts (the pretrained weights plus seeded noise), as safetensors folders."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(config(layers)).eval()
    base.save_pretrained(folder / "base")
    state = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    for k in range(experts):
        generator = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for name, param in base.named_parameters():
                param.copy_(state[name] + 0.01 * torch.randn(param.shape, generator=generator))
        base.save_pretrained(folder / f"e{k}")
        base.load_state_dict(state)


def run(folder: Path, experts: int, method: str) -> dict:
    from transformers import LlamaForCausalLM

    from adamerge.methods import METHODS

    torch.set_num_threads(2)
    pretrained = LlamaForCausalLM.from_pretrained(folder / "base").eval()
    for param in pretrained.parameters():  # loaded memory-mapped: page it in before the baseline
        param.sum()
    parameters = sum(p.numel() for p in pretrained.parameters())
    largest = max(p.numel() for p in pretrained.parameters())
    baseline = reset_peak_rss()
    started = time.perf_counter()
    METHODS.get(method)(pretrained, {f"e{k}": str(folder / f"e{k}") for k in range(experts)})
    seconds = time.perf_counter() - started
    return {
        "peak_mb": rss_mb("VmHWM") - baseline, "seconds": seconds,
        "predicted_mb": (parameters + (experts + 2) * largest) * 4 / 2**20,
        "all_task_vectors_mb": experts * parameters * 4 / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    if argv and argv[0] == "--child":
        folder, experts, method = argv[1:]
        print(json.dumps(run(Path(folder), int(experts), method)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--method", default="task_arithmetic")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("runs/merge-memory"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.out) as folder:
        make_models(Path(folder), max(args.experts), args.layers)
        for experts in args.experts:
            rows.append({"experts": experts, **in_fresh_process(__file__, folder, str(experts), args.method)})
            print(json.dumps(rows[-1]), flush=True)
    lines = [
        f"`{args.method}` on a Llama-style model (hidden {HIDDEN}, {args.layers} layers, vocabulary {VOCAB}), "
        "experts as safetensors folders; MiB, fresh process each.",
        "",
        "| K | peak + | predicted | all task vectors (not held) | seconds |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['experts']} | {row['peak_mb']:.0f} | {row['predicted_mb']:.0f} | "
                     f"{row['all_task_vectors_mb']:.0f} | {row['seconds']:.1f} |")
    lines += ["", f"peak ratio K={rows[-1]['experts']} / K={rows[0]['experts']}: {rows[-1]['peak_mb'] / rows[0]['peak_mb']:.2f}"]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
