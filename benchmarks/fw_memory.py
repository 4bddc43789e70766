"""Peak memory of hard FW-Merging as the pool grows, against holding every task vector.

FW-Merging keeps one copy of the merged weights (plus its gradient) and reads pool members one
tensor at a time from memory-mapped safetensors files, so its peak should stay flat in the
pool size ``K``; learning coefficients (AdaMerging) holds all ``K`` task vectors at once.

Each measurement runs in a fresh subprocess. After setup (imports, the pretrained model,
calibration data) the process's peak-RSS mark is reset (``/proc/self/clear_refs``), so the
reported increase is what the run itself added.

    python benchmarks/fw_memory.py [--sizes 2 4 8 16] [--iterations 3] [--width 2048]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

INPUTS, CLASSES = 1024, 10


def make_model(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(INPUTS, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, INPUTS)
    )


def build_pool(folder: Path, experts: int, width: int) -> None:
    """``pretrained.safetensors`` and ``expert_<k>.safetensors`` (the pretrained weights plus seeded noise)."""
    from adamerge.io.checkpoints import save_safetensors

    torch.manual_seed(0)
    pretrained = make_model(width).state_dict()
    save_safetensors(pretrained, folder / "pretrained.safetensors")
    for k in range(experts):
        generator = torch.Generator().manual_seed(100 + k)
        expert = {name: t + 0.01 * torch.randn(t.shape, generator=generator) for name, t in pretrained.items()}
        save_safetensors(expert, folder / f"expert_{k}.safetensors")


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(method: str, folder: Path, experts: int, width: int, iterations: int) -> dict:
    """One measurement: ``fw`` (hard FW-Merging) or ``task_vectors`` (TaskVectors.from_models)."""
    from safetensors.torch import load_file

    from adamerge.learning.data import CalibrationData
    from adamerge.learning.frank_wolfe import frank_wolfe_merge
    from adamerge.objectives import build_objective
    from adamerge.core.task_vectors import TaskVectors
    from adamerge.tasks.base import HeadTask

    torch.set_num_threads(2)
    model = make_model(width)
    model.load_state_dict(load_file(str(folder / "pretrained.safetensors")))
    pool = {f"expert_{k}": str(folder / f"expert_{k}.safetensors") for k in range(experts)}
    generator = torch.Generator().manual_seed(0)
    rows = [{"inputs": torch.randn(INPUTS, generator=generator)} for _ in range(64)]
    tasks = {"t": HeadTask("t", nn.Linear(INPUTS, CLASSES))}
    data = CalibrationData({"t": rows}, batch_size=16)
    exact = _reset_peak()
    before = _rss_mb("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if method == "fw":
        frank_wolfe_merge(model, pool, tasks, data, build_objective("entropy"), iterations=iterations, batches_per_iteration=1)
    else:
        vectors = TaskVectors.from_models(model, pool)
        assert vectors.num_experts == experts
    peak = _rss_mb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"rss_before_mb": before, "peak_mb": peak, "increase_mb": peak - before, "model_mb": model_mb, "exact": exact}


def measure(method: str, folder: Path, experts: int, width: int, iterations: int) -> dict:
    command = [sys.executable, __file__, "--worker", method, "--dir", str(folder), "--pool", str(experts),
               "--width", str(width), "--iterations", str(iterations)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--worker", choices=["fw", "task_vectors"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pool", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.dir, args.pool, args.width, args.iterations)))
        return
    with tempfile.TemporaryDirectory(prefix="fw_memory-") as tmp:
        folder = Path(tmp)
        build_pool(folder, max(args.sizes), args.width)
        rows = [(k, measure("fw", folder, k, args.width, args.iterations), measure("task_vectors", folder, k, args.width, 0))
                for k in args.sizes]
    model_mb = rows[0][1]["model_mb"]
    note = "" if rows[0][1]["exact"] else " (peak mark could not be reset: increases include setup)"
    print(f"MLP of {model_mb:.1f} MB (fp32), hard FW-Merging with {args.iterations} iterations{note}")
    print("| pool K | FW peak RSS (MB) | FW increase (MB) | all task vectors: increase (MB) | K x model (MB) |")
    print("|---|---|---|---|---|")
    for k, fw, tv in rows:
        print(f"| {k} | {fw['peak_mb']:.0f} | {fw['increase_mb']:.0f} | {tv['increase_mb']:.0f} | {k * model_mb:.0f} |")


if __name__ == "__main__":
    main()
