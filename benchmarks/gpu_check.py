"""The GPU check: every job on the GPU against the same job on the CPU, in one run (a few minutes).

    python benchmarks/gpu_check.py [--out runs/gpu-check] [--device cuda] [--layers 4]

Builds a small Llama-architecture zoo from ``LlamaConfig`` (no download: K = 2 experts, saved
sharded) and runs, once with ``trainer.accelerator: cpu`` and once on ``--device``:

- ``adamerge merge`` with task arithmetic, TSV-M and WUDI (merged-weight difference);
- ``adamerge fit`` all at once (expert KL, layer-wise), progressive (element-wise) and streamed
  progressive from WUDI (coefficient and merged-weight differences, seconds per step);
- each job's peak accelerator memory (``torch.cuda.max_memory_allocated``) beside the dominant
  terms of the formulas in ``docs/performance.md`` for this model;
- WUDI and TSV-M on 7B-shaped matrices (``[4, 4096, 4096]``): seconds and peak memory;
- with more than one GPU, the all-at-once fit under DDP against one device.

Prints one table and writes ``<out>/gpu_check.json``. ``--device cpu`` runs the whole check on
the CPU against itself (every difference 0): the way to try the script on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from adamerge.app import runner
from adamerge.app.config import load_recipe
from adamerge.io.checkpoints import open_weights

JOBS = {  # label -> (job, recipe sections)
    "task arithmetic": ("merge", {"method": {"name": "task_arithmetic", "args": {"scaling": 0.3}}}),
    "TSV-M": ("merge", {"method": {"name": "tsv"}}),
    "WUDI": ("merge", {"method": {"name": "wudi", "args": {"iterations": 20}}}),
    "expert KL, all at once": ("fit", {"objectives": [{"name": "expert_kl"}], "coefficients": {"granularity": "layer", "init": 0.3},
                                       "trainer": {"max_steps": 20, "batch_size": 4}}),
    "progressive, element-wise": ("fit", {"objectives": [], "coefficients": {"granularity": "element", "init": 0.3},
                                          "progressive": {"epochs": 4, "samples_per_task": 8}, "trainer": {"batch_size": 4}}),
    "streamed from WUDI": ("fit", {"objectives": [], "coefficients": {"granularity": "layer", "init": 0.0},
                                   "task_vectors": {"start": {"method": "wudi", "args": {"iterations": 20}}},
                                   "progressive": {"epochs": 4, "samples_per_task": 8, "stream": True}, "trainer": {"batch_size": 4}}),
}


def build_zoo(root: Path, layers: int) -> dict:
    """A tiny Llama (hidden 256, ``layers`` blocks, vocabulary 512, untied head) and two experts
    (seeded noise), sharded safetensors folders, and 16 instruction rows per task."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(500)]
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base", max_shard_size="2MB")
    tokenizer.save_pretrained(root / "base")
    tasks = {}
    for k, name in enumerate(("a", "b")):
        expert = LlamaForCausalLM(config)
        expert.load_state_dict(base.state_dict())
        generator = torch.Generator().manual_seed(10 + k)
        with torch.no_grad():
            for param in expert.parameters():
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
        expert.save_pretrained(root / name, max_shard_size="2MB")
        rows = [json.dumps({"q": " ".join(words[(7 * i + k) % 500 : (7 * i + k) % 500 + 6]), "a": words[(i * 13 + k) % 500]})
                for i in range(16)]
        (root / f"{name}.jsonl").write_text("\n".join(rows))
        source = {"path": str(root / f"{name}.jsonl")}
        tasks[name] = {"expert": str(root / name), "text": "q", "response": "a", "calibration": source}
    return {"kind": "hf_causal_lm", "pretrained": str(root / "base"), "max_length": 16, "tasks": tasks}


def run_job(label: str, problem: dict, out: Path, accelerator: str, device: torch.device, **trainer_fields) -> dict:
    job, sections = JOBS[label]
    trainer = {"progress_bar": False, "accelerator": accelerator, **sections.get("trainer", {}), **trainer_fields}
    recipe = load_recipe({
        "name": label.replace(" ", "_").replace(",", ""), "output_dir": str(out), "overwrite": True,
        "problem": problem, "evaluation": {"enabled": False}, "export": {"plot": False, "mergekit": False},
        **{k: v for k, v in sections.items() if k != "trainer"}, "trainer": trainer,
    })
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    getattr(runner, job)(recipe)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    steps = sections.get("trainer", {}).get("max_steps") or _progressive_steps(out)
    return {"seconds": seconds, "peak_mib": peak, "seconds_per_step": seconds / steps if steps else None}


def _progressive_steps(out: Path) -> int | None:
    history = out / "progressive.json"
    return sum(s["steps"] for s in json.loads(history.read_text())) if history.exists() else None


def differences(cpu_run: Path, device_run: Path) -> dict:
    """The largest absolute differences between two runs' merged weights and coefficients."""
    one, other = dict(open_weights(str(cpu_run / "merged"))), dict(open_weights(str(device_run / "merged")))
    weights = max((one[k].float() - other[k].float()).abs().max().item() for k in one)
    result = {"merged_weights": weights}
    if (cpu_run / "coefficients.safetensors").exists():
        a, b = dict(open_weights(str(cpu_run / "coefficients.safetensors"))), dict(open_weights(str(device_run / "coefficients.safetensors")))
        result["coefficients"] = max((a[k] - b[k]).abs().max().item() for k in a)
    return result


def formula_mib(problem: dict, label: str) -> float:
    """The dominant terms of docs/performance.md's formulas for this model, in MiB: all at once,
    θ_0 + K task vectors (float32); progressive, one block's tensors and its K task vectors."""
    base = dict(open_weights(problem["pretrained"]))
    total = sum(t.numel() for t in base.values()) * 4
    experts = len(problem["tasks"])
    if "progressive" in label or "streamed" in label:
        block = sum(t.numel() for k, t in base.items() if ".layers.0." in k) * 4
        held = total if "streamed" not in label else block
        return (held + (experts + 2) * block) / 2**20
    return (1 + experts) * total / 2**20


def big_matrices(device: torch.device, size: int) -> dict:
    """WUDI and TSV-M on a 7B-shaped projection stack ``[4, size, size]`` (4096: Llama-2-7B's)."""
    from adamerge.methods.tsv import tsv_delta
    from adamerge.methods.wudi import wudi_delta

    stack = torch.randn(4, size, size, device=device) * 1e-3
    results = {}
    for name, run in (("TSV-M", lambda: tsv_delta(stack)), ("WUDI (20 iterations)", lambda: wudi_delta(stack, 20, 1e-5, str(device)))):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        results[name] = {"seconds": time.perf_counter() - started,
                         "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
    return results


def print_table(jobs: dict) -> None:
    """One row per job: seconds on each side, the device's seconds per step and peak memory beside the
    formula's, and the largest differences from the CPU run."""
    print(f"\n{'job':28} {'cpu s':>7} {'dev s':>7} {'s/step':>8} {'peak MiB':>9} {'formula':>8} {'Δ weights':>10} {'Δ coeff':>9}")
    for label, row in jobs.items():
        device = row["device"]
        peak = f"{device['peak_mib']:.0f}" if device["peak_mib"] is not None else "-"
        per_step = f"{device['seconds_per_step']:.3f}" if device["seconds_per_step"] else "-"
        print(f"{label:28} {row['cpu']['seconds']:7.1f} {device['seconds']:7.1f} {per_step:>8} {peak:>9} "
              f"{row['formula_mib']:8.0f} {row['merged_weights']:10.2e} {row.get('coefficients', 0.0):9.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu-check")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (the script against itself)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--matrix-size", type=int, default=4096, help="the big-matrix check's side (512 for a CPU try)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no GPU visible to torch: run with --device cpu to try the script on this machine", file=sys.stderr)
        return 2
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    problem = build_zoo(out / "zoo", args.layers)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "tf32": torch.backends.cuda.matmul.allow_tf32, "jobs": {}}
    for label in JOBS:
        on_cpu = run_job(label, problem, out / "cpu" / label.replace(" ", "_"), "cpu", torch.device("cpu"))
        on_device = run_job(label, problem, out / "device" / label.replace(" ", "_"), accelerator, device)
        diff = differences(out / "cpu" / label.replace(" ", "_"), out / "device" / label.replace(" ", "_"))
        report["jobs"][label] = {"cpu": on_cpu, "device": on_device, "formula_mib": formula_mib(problem, label), **diff}
    print_table(report["jobs"])
    report["7B-shaped matrices"] = big_matrices(device, args.matrix_size)
    for name, figures in report["7B-shaped matrices"].items():
        print(f"{name} on [4, {args.matrix_size}, {args.matrix_size}]: {figures['seconds']:.1f} s, "
              f"peak {figures['peak_mib'] or 0:.0f} MiB")
    if device.type == "cuda" and torch.cuda.device_count() > 1:  # ddp_spawn: the ranks do not rerun this script
        report["ddp"] = run_job("expert KL, all at once", problem, out / "ddp", "gpu", device,
                                devices=torch.cuda.device_count(), strategy="ddp_spawn")
        print(f"DDP on {torch.cuda.device_count()} GPUs: {report['ddp']['seconds']:.1f} s")
    else:
        print("DDP: one device visible, not run")
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print(f"\nwritten: {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
