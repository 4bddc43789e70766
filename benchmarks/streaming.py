"""Peak memory of streamed progressive learning and of the streamed all-at-once objective
(``trainer.stream``) against all-at-once layer-wise learning, as the model gets deeper: Llama-style models of fixed width (``LlamaConfig``, hidden 384, 4 to 32
layers), K = 8 experts, every checkpoint saved as sharded safetensors.

    python benchmarks/streaming.py [--layers 4 8 16 32] [--experts 8] [--out runs/streaming] [--streamed-only]
                                   [--malloc-mmap-threshold BYTES]

Each configuration runs in a fresh process. "peak +" is the growth of its peak RSS
(``VmHWM``) over its RSS once the libraries, the calibration batches and the model's structure
(on ``meta`` for the streamed run) are in memory: what learning the merge itself costs.

- streamed: :class:`~adamerge.learning.progressive.ProgressiveDistiller` with ``weights=`` (the
  pretrained checkpoint read one stage at a time) and a :class:`~adamerge.io.shards.ShardWriter`
  (the merged model written shard by shard), layer-wise coefficients, one epoch per stage.
- streamed fit: the all-at-once learner's objective below on a model never whole in memory
  (:class:`~adamerge.learning.streamed_merge.StreamedMergedModel`: each block read, merged and
  dropped as it runs, and again in the backward), one backward per batch.
- all at once: the whole pretrained model, K task vectors over every tensor and a
  :class:`~adamerge.core.merged.MergedModel` with layer-wise coefficients; a few Adam steps of the
  merged logits against each expert's (KL), one merge per step, one backward over all tasks.

The prediction for the streamed run is the README's formula: the largest stage's
``(1 + K + 2) · |block| · 4`` bytes (its base, K task vectors, the merged weights and their
gradient, fp32) plus the cached features (two sets per task, for the stage being left and the
stage being entered: ``4 · 2 · 2 · tasks · rows · tokens · hidden``) plus one stage's
activations for a batch, measured here as the peak of a plain block forward + backward.
The README's head-stage term (its weights, the features entering it and each task's expert
logits: ~30 MB at this vocabulary of 512) is below the block stage's, so the prediction is the latter.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import reset_peak_rss, rss_mb  # noqa: E402

HIDDEN, INTERMEDIATE, VOCAB, HEADS = 384, 1024, 512, 6
ROWS, TOKENS, BATCH = 8, 64, 4  # calibration rows per task, tokens per row, rows per batch


def config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                       num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=TOKENS,
                       tie_word_embeddings=True)


def make_models(folder: Path, layers: int, experts: int) -> None:
    """The pretrained model and ``experts`` seeded perturbations of it, as sharded safetensors."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(config(layers)).eval()
    base.save_pretrained(folder / "base", max_shard_size="50MB")
    for k in range(experts):
        generator = torch.Generator().manual_seed(100 + k)
        expert = LlamaForCausalLM(config(layers)).eval()
        expert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for param in expert.parameters():
                param.add_(0.01 * torch.randn(param.shape, generator=generator))
        expert.save_pretrained(folder / f"e{k}", max_shard_size="50MB")


def batches(experts: int) -> dict[str, list[dict]]:
    generator = torch.Generator().manual_seed(0)
    out = {}
    for k in range(experts):
        out[f"e{k}"] = []
        for _ in range(ROWS // BATCH):
            ids = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=generator)
            ones = torch.ones_like(ids)
            out[f"e{k}"].append({"input_ids": ids, "attention_mask": ones, "loss_mask": ones})
    return out


def block_numel() -> int:
    from transformers import LlamaForCausalLM

    from adamerge.core.skeleton import parameters_on_meta

    with parameters_on_meta():
        model = LlamaForCausalLM(config(1))
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.0."))


# ---------------------------------------------------------------------- the two learners (child processes)


def skeleton_setup(folder: Path, experts: int):
    """What both streamed learners start from: expert names, calibration batches, the model's
    skeleton on ``meta``, its merged keys, layer-wise coefficients at 0.3 and the tasks."""
    from transformers import LlamaForCausalLM

    from adamerge.core.coefficients import MergeCoefficients
    from adamerge.core.layouts import build_layout
    from adamerge.core.skeleton import parameters_on_meta, state_keys
    from adamerge.tasks.hf import CausalLMTask

    names = [f"e{k}" for k in range(experts)]
    with parameters_on_meta():
        skeleton = LlamaForCausalLM(config(json.loads((folder / "base" / "config.json").read_text())["num_hidden_layers"])).eval()
    keys = [k for k in state_keys(skeleton) if k in dict(skeleton.named_parameters())]
    shapes = {n: tuple(p.shape) for n, p in skeleton.named_parameters() if n in keys}
    coefficients = MergeCoefficients(build_layout(names, shapes, "layer"), init=0.3)
    return names, batches(experts), skeleton, keys, coefficients, {n: CausalLMTask(n) for n in names}


def run_streamed(folder: Path, experts: int) -> dict:
    from adamerge.io.checkpoints import open_weights
    from adamerge.io.shards import ShardWriter
    from adamerge.learning.progressive import ProgressiveDistiller

    names, data, skeleton, keys, coefficients, tasks = skeleton_setup(folder, experts)
    baseline = reset_peak_rss()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        distiller = ProgressiveDistiller(
            skeleton, {n: str(folder / n) for n in names}, tasks, data, coefficients, keys=keys, epochs=1, lr=1e-2,
            progress=False, weights=open_weights(str(folder / "base")), writer=ShardWriter(out, 2 + len(skeleton.model.layers)),
        )
        distiller.run()
        distiller.writer.finish()
    return {"peak_mb": rss_mb("VmHWM") - baseline, "seconds": time.perf_counter() - started}


def run_all_at_once(folder: Path, experts: int, steps: int = 3) -> dict:
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    from adamerge.tasks.hf import CausalLMTask
    from adamerge.core.merged import MergedModel
    from adamerge.core.task_vectors import TaskVectors

    names = [f"e{k}" for k in range(experts)]
    data = batches(experts)
    baseline = reset_peak_rss()
    started = time.perf_counter()
    pretrained = LlamaForCausalLM.from_pretrained(folder / "base").eval()
    vectors = TaskVectors.from_models(pretrained, {n: str(folder / n) for n in names})
    merged = MergedModel(pretrained, vectors, "layer", init=0.3)
    tasks = {n: CausalLMTask(n) for n in names}
    with torch.no_grad():  # each expert's logits, once, as the expert-KL objective's targets
        targets = {n: [tasks[n](merged, merged.expert_parameters(n), b).logits.log_softmax(-1) for b in data[n]] for n in names}
    optimizer = torch.optim.Adam(merged.coefficients.parameters(), lr=1e-2)
    for step in range(steps):
        params = merged.merged_parameters()
        loss = sum(
            F.kl_div(tasks[n](merged, params, b).logits.log_softmax(-1), t, log_target=True, reduction="batchmean")
            for n in names for b, t in zip(data[n], targets[n])
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"peak_mb": rss_mb("VmHWM") - baseline, "seconds": time.perf_counter() - started}


def run_streamed_fit(folder: Path, experts: int, steps: int = 3) -> dict:
    """The all-at-once objective (expert KL, layer-wise) on a model never whole in memory
    (``trainer.stream``: :class:`~adamerge.learning.streamed_merge.StreamedMergedModel`); one
    backward per batch, so only that batch's activations at block boundaries are alive."""
    import torch.nn.functional as F

    from adamerge.io.checkpoints import open_weights
    from adamerge.learning.streamed_merge import StreamedMergedModel

    names, data, skeleton, keys, coefficients, tasks = skeleton_setup(folder, experts)
    baseline = reset_peak_rss()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        merged = StreamedMergedModel(skeleton, open_weights(str(folder / "base")), {n: str(folder / n) for n in names},
                                     coefficients, keys, cache, progress=False)
        with torch.no_grad():
            targets = {n: [tasks[n](merged, merged.expert_parameters(n), b).logits.log_softmax(-1) for b in data[n]]
                       for n in names}
        optimizer = torch.optim.Adam(merged.coefficients.parameters(), lr=1e-2)
        for step in range(steps):
            optimizer.zero_grad()
            for n in names:
                for b, t in zip(data[n], targets[n]):
                    logits = tasks[n](merged, merged.merged_parameters(), b).logits.log_softmax(-1)
                    F.kl_div(logits, t, log_target=True, reduction="batchmean").backward()
            optimizer.step()
    return {"peak_mb": rss_mb("VmHWM") - baseline, "seconds": time.perf_counter() - started}


def activations_mb(experts: int) -> float:
    """Peak of one block's plain forward + backward on one batch, its weights' gradients aside."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(config(1)).eval()
    ids = batches(1)["e0"][0]["input_ids"]
    hidden = model.model.embed_tokens(ids).detach().requires_grad_(True)
    position = torch.arange(TOKENS).unsqueeze(0)
    rotary = model.model.rotary_emb(hidden, position)
    model.requires_grad_(False)
    baseline = reset_peak_rss()
    out = model.model.layers[0](hidden, position_embeddings=rotary, attention_mask=None)
    out = out[0] if isinstance(out, tuple) else out
    out.pow(2).mean().backward()
    return rss_mb("VmHWM") - baseline


def warm_up() -> None:
    """One forward + backward of a 1-layer model first, so that what the libraries load on their
    first use (kernels, lazily imported modules) is in the baseline, not in the peak."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config(1)).eval()
    batch = batches(1)["e0"][0]
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.sum().backward()
    del model


def child(argv: list[str]) -> int:
    mode, folder, experts = argv[0], Path(argv[1]), int(argv[2])
    torch.set_num_threads(2)
    warm_up()
    learners = {"streamed": run_streamed, "streamed_fit": run_streamed_fit, "all_at_once": run_all_at_once}
    result = learners[mode](folder, experts) if mode != "activations" \
        else {"peak_mb": activations_mb(experts)}
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------------- the benchmark


def in_fresh_process(*args: str, env: dict | None = None) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def predicted_mb(experts: int, activations: float) -> float:
    weights = (1 + experts + 2) * block_numel() * 4
    features = 4 * 2 * 2 * experts * ROWS * TOKENS * HIDDEN
    return (weights + features) / 2**20 + activations


def main(argv: list[str] | None = None) -> int:
    if argv and argv[0] == "--child":
        return child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("runs/streaming"))
    parser.add_argument("--streamed-only", action="store_true", help="skip the all-at-once runs (minutes and GBs each)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="run the streamed learners with glibc's MALLOC_MMAP_THRESHOLD_ fixed at BYTES")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    heap = {"MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)} if args.malloc_mmap_threshold else None
    activations = in_fresh_process("activations", ".", str(args.experts))["peak_mb"]
    predicted = predicted_mb(args.experts, activations)
    rows = []
    for layers in args.layers:
        with tempfile.TemporaryDirectory(dir=args.out) as folder:
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                            f"from streaming import make_models; from pathlib import Path; "
                            f"make_models(Path({folder!r}), {layers}, {args.experts})"], check=True, capture_output=True)
            streamed = in_fresh_process("streamed", folder, str(args.experts), env=heap)
            streamed_fit = in_fresh_process("streamed_fit", folder, str(args.experts), env=heap)
            at_once = {"peak_mb": float("nan"), "seconds": float("nan")} if args.streamed_only else in_fresh_process("all_at_once", folder, str(args.experts))
        rows.append({"layers": layers, "streamed_mb": streamed["peak_mb"], "all_at_once_mb": at_once["peak_mb"],
                     "streamed_fit_mb": streamed_fit["peak_mb"], "streamed_fit_s": streamed_fit["seconds"],
                     "streamed_s": streamed["seconds"], "all_at_once_s": at_once["seconds"], "predicted_streamed_mb": predicted})
        print(json.dumps(rows[-1]), flush=True)
    first = rows[0]
    lines = [
        f"K = {args.experts} experts, hidden {HIDDEN}, {block_numel() / 1e6:.2f} M parameters per block, "
        f"{ROWS} calibration rows x {TOKENS} tokens per task; peak RSS growth in MiB (fresh process each).",
        "",
        "| layers | streamed | streamed fit | all at once | streamed / 4 layers | streamed fit / 4 layers | all at once / 4 layers "
        "| streamed: predicted | streamed s | streamed fit s | all at once s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['layers']} | {row['streamed_mb']:.0f} | {row['streamed_fit_mb']:.0f} | {row['all_at_once_mb']:.0f} | "
            f"{row['streamed_mb'] / first['streamed_mb']:.2f}x | {row['streamed_fit_mb'] / first['streamed_fit_mb']:.2f}x | "
            f"{row['all_at_once_mb'] / first['all_at_once_mb']:.2f}x | "
            f"{row['predicted_streamed_mb']:.0f} ({row['streamed_mb'] / row['predicted_streamed_mb'] - 1:+.0%}) | "
            f"{row['streamed_s']:.0f} | {row['streamed_fit_s']:.0f} | {row['all_at_once_s']:.0f} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "activations_mb": activations}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
