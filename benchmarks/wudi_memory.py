"""Peak memory and time of WUDI on one tall matrix: the shape of an untied LM head, scaled down.

    python benchmarks/wudi_memory.py [--experts 4] [--rows 16384] [--cols 256] [--iterations 300] [--threads 2]

Run it as its own process (the peak-RSS mark is the process's). A seeded ``[K, m, n]`` float32
stack (``[4, 16384, 256]``: 67 MB) is built first, the peak-RSS mark (``VmHWM``) is reset after it,
then :func:`~adamerge.methods.wudi.wudi_delta` runs on the CPU. Printed: the growth of the peak
over that baseline (what WUDI itself held: the start, the merged matrix, the ``m × n`` offset,
the gradient, Adam's two moments and a step's two temporaries, beside the small ``n × n`` Gram;
no copy of the stack) and the wall time. The gradient's
offset is contracted task by task through ``n × n`` products; through ``m × m`` the
``[K, m, m]`` intermediate alone would be ``4 · 16384² · 4`` bytes = 4.3 GB.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import reset_peak_rss, rss_mb  # noqa: E402

from adamerge.methods.wudi import wudi_delta  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--rows", type=int, default=16384, help="m, the tall side (an LM head's vocabulary)")
    parser.add_argument("--cols", type=int, default=256, help="n, the hidden size")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    taus = 1e-3 * torch.randn(args.experts, args.rows, args.cols, generator=generator)
    baseline = reset_peak_rss()
    started = time.perf_counter()
    wudi_delta(taus, iterations=args.iterations, device="cpu")
    seconds = time.perf_counter() - started
    growth = rss_mb("VmHWM") - baseline
    print(
        f"WUDI on [{args.experts}, {args.rows}, {args.cols}] float32 ({taus.nbytes / 1e6:.0f} MB), "
        f"{args.iterations} steps, {args.threads} threads: peak RSS +{growth:.0f} MiB ({growth * 2**20 / 1e9:.3f} GB), "
        f"{seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
