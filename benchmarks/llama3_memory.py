"""Peak memory of adamerge's LLM jobs at Llama-3's shapes, each against a formula read from the code.

    python benchmarks/llama3_memory.py [--vocab 128256] [--hidden 512] [--layers 4] [--experts 4]
                                       [--jobs wudi tsv streamed_wudi expert_kl] [--out runs/llama3-memory]
    python benchmarks/llama3_memory.py --formulas-only    # the formulas at Llama-2-7B, Llama-3-8B, 70B shapes

A Llama model from ``LlamaConfig`` with Llama-3's vocabulary (128,256 tokens) and an untied head,
narrow and shallow so that the runs fit a small machine (hidden 512, 4 layers, intermediate 3.5 ×
hidden, 64-wide heads with four query heads per key/value head, as Llama-3), float32; K experts
(seeded perturbations of it) and the pretrained model saved by ``save_pretrained`` as sharded
safetensors, a word tokenizer beside it, and per task a few ``{prompt, response}`` jsonl rows.
Each job runs in a fresh process, through the runner as ``adamerge merge`` / ``adamerge fit``
runs it, with the sections of the built-in recipe it names (only the problem and the budget
replaced): ``wudi`` and ``tsv`` (recipes/lm/wudi.yaml, tsv.yaml), ``streamed_wudi``
(recipes/lm/streamed_wudi.yaml, one epoch per stage), ``expert_kl`` (recipes/lm/wudi_expert_kl.yaml:
the all-at-once learner from WUDI, two steps) and ``streamed_expert_kl`` (recipes/lm/streamed_expert_kl.yaml:
the same learner with ``trainer.stream``, two steps). "peak +" is the growth of peak RSS (``VmHWM``) over
the process once the libraries are imported and warmed up: the job's whole cost, the pretrained
model included.

The formula beside each is the sum of what the job's code holds at its peak (``phases``: each
job's candidate peaks term by term; ``docs/performance.md`` has them in words); the ratio
measured / formula is the check. The same formulas, at the sizes of real Llamas (parameters
counted from their configs' numbers, ``LARGE``), make the second table. About 25 minutes on 2
CPU cores, peak ~6 GB; ``--vocab 32768 --layers 2 --wudi-iterations 3`` tries it in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import REPO, in_fresh_process, reset_peak_rss, rss_mb  # noqa: E402

JOBS = {  # job -> (runner function, built-in recipe)
    "wudi": ("merge", "lm/wudi.yaml"),
    "tsv": ("merge", "lm/tsv.yaml"),
    "streamed_wudi": ("fit", "lm/streamed_wudi.yaml"),
    "expert_kl": ("fit", "lm/wudi_expert_kl.yaml"),
    "streamed_expert_kl": ("fit", "lm/streamed_expert_kl.yaml"),
}
ROWS, PROMPT_WORDS, ANSWER_WORDS = 8, 30, 2  # calibration rows per task, words per prompt and answer
WORDS = [f"w{i}" for i in range(200)]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MiB, GB = 2**20, 1e9


@dataclass(frozen=True)
class Shape:
    """A Llama's sizes (from its config) and the run's: K experts, T tasks of N rows of L tokens, A predicted."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    experts: int = 4
    rows: int = ROWS
    tokens: int = PROMPT_WORDS + 2 + ANSWER_WORDS  # [CLS] prompt [SEP] answer
    answers: int = ANSWER_WORDS

    @property
    def head(self) -> int:  # the untied head's entries (the embedding table's too): the largest tensor
        return self.vocab * self.hidden

    @property
    def block(self) -> int:
        kv = self.hidden // self.heads * self.kv_heads
        return 2 * self.hidden * (self.hidden + kv) + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def total(self) -> int:
        return 2 * self.head + self.layers * self.block + self.hidden


LARGE = {  # from the models' config.json (vocab_size, hidden_size, intermediate_size, layers, heads, key/value heads)
    "Llama-2-7B": Shape(32000, 4096, 11008, 32, 32, 32),
    "Llama-3-8B": Shape(128256, 4096, 14336, 32, 32, 8),
    "Llama-3-70B": Shape(128256, 8192, 28672, 80, 64, 8),
}
LARGE_RUN = {"experts": 4, "rows": 64, "tokens": 512, "answers": 4}  # K = T = 4, 64 rows of 512 tokens, 4 predicted


def phases(shape: Shape, b: int, b_stage: int, b_tau: int) -> dict[str, dict[str, dict[str, float]]]:
    """Each job's candidate peaks, term by term (bytes), from what its code holds there. ``b``: bytes
    per weight of the loaded model; ``b_stage``: the streamed stage's task vectors; ``b_tau``: the
    all-at-once task vectors. A data-free method's stack of one tensor's K task vectors is float32."""
    k, model, head, matrix = shape.experts, shape.total * b, shape.head, shape.hidden * shape.intermediate
    features = 2 * 2 * shape.experts * shape.rows * shape.tokens * shape.hidden * b  # merged + expert, two stages

    def solve(entries: int, method: str = "wudi") -> dict[str, float]:  # one tensor's stack and the method's work
        return {"K task vectors of one tensor (float32)": k * entries * 4,
                "WUDI's solve (8 matrices)" if method == "wudi" else "TSV-M's SVDs (4 matrices)": (8 if method == "wudi" else 4) * entries * 4}

    def stage(entries: int, copies: int, largest: int) -> dict[str, float]:  # a streamed stage while WUDI starts it
        return {"the stage's tensors": entries * b, "the stage's task vectors": k * entries * b_stage,
                "the start's copy of the stage": copies * entries * b, **solve(largest), "cached features": features}

    return {
        "wudi": {"the head's solve": {"pretrained model": model, "merged copy": model, **solve(head)}},
        "tsv": {"the head's SVDs": {"pretrained model": model, "merged copy": model, **solve(head, "tsv")}},
        "streamed_wudi": {
            "head stage, WUDI start": stage(head, 2, head),  # the embedding's stand-in is copied too
            "block stage, WUDI start": stage(shape.block, 1, matrix),
        },
        "streamed": {  # without a start (recipes/lm/streamed.yaml; measured by benchmarks/streaming.py)
            "head stage": {"the stage's tensors, merged weights, gradient": 3 * head * b, "task vectors": k * head * b_stage,
                           "features entering": features / 2,
                           "expert logits at predicted tokens": shape.experts * shape.rows * shape.answers * shape.vocab * b},
            "block stage": {"the stage's tensors, merged weights, gradient": 3 * shape.block * b,
                            "task vectors": k * shape.block * b_stage, "cached features": features},
        },
        "streamed_expert_kl": {  # trainer.stream: each unit's vectors cached once (WUDI computed per unit), then steps
            "the head's vectors cached, WUDI start": {
                "the unit's tensors": head * b, "its K task vectors": k * head * b_tau, "the start's copy": head * b,
                "the start and K new vectors": (k + 1) * head * b_tau, **solve(head)},
            "a step through the head": {
                "the unit's tensors, merged, gradient": 3 * head * b, "K + 1 task vectors": (k + 1) * head * b_tau,
                "expert targets": shape.experts * shape.rows * shape.answers * shape.vocab * 4},
        },
        "expert_kl": {
            "WUDI start, the head's solve": {"pretrained model": model, "task vectors": k * shape.total * b_tau,
                                             "start's merged copy": model, **solve(head)},
            "start vectors built": {"pretrained model": model, "start's merged copy": model,
                                    "2K + 1 task vectors": (2 * k + 1) * shape.total * b_tau},
            "a step (activations aside)": {"pretrained, merged, gradient": 3 * model,
                                           "K + 1 task vectors": (k + 1) * shape.total * b_tau,
                                           "expert targets": shape.experts * shape.rows * shape.answers * shape.vocab * 4},
        },
    }


def peak(candidates: dict[str, dict[str, float]]) -> tuple[str, float]:
    """The largest candidate: its name and bytes."""
    name = max(candidates, key=lambda c: sum(candidates[c].values()))
    return name, sum(candidates[name].values())


def llama_config(vocab: int, hidden: int, layers: int):
    from transformers import LlamaConfig

    heads = hidden // 64
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(3.5 * hidden), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), max_position_embeddings=256,
        rope_theta=500000.0, tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )


def make_zoo(folder: Path, vocab: int, hidden: int, layers: int, experts: int, shard: str) -> None:
    """The pretrained model (with a word tokenizer), ``experts`` perturbations of it, and each task's rows."""
    from transformers import BertTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(vocab, hidden, layers)).eval()
    model.save_pretrained(folder / "base", max_shard_size=shard)
    BertTokenizer(vocab={w: i for i, w in enumerate(SPECIALS + WORDS)}).save_pretrained(folder / "base")
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for k in range(experts):
        generator = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(state[name] + 0.01 * torch.randn(param.shape, generator=generator))
        model.save_pretrained(folder / f"e{k}", max_shard_size=shard)
    del state, model
    generator = torch.Generator().manual_seed(1)
    for k in range(experts):
        words = torch.randint(0, len(WORDS), (ROWS, PROMPT_WORDS + ANSWER_WORDS), generator=generator).tolist()
        rows = [{"prompt": " ".join(WORDS[i] for i in row[:PROMPT_WORDS]),
                 "response": " ".join(WORDS[i] for i in row[PROMPT_WORDS:])} for row in words]
        (folder / f"task{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def recipe_for(job: str, folder: Path, experts: int, wudi_iterations: int):
    """The built-in recipe's sections (not its problem) over this zoo, with a small budget."""
    from omegaconf import OmegaConf

    from adamerge.app.config import load_recipe

    path = REPO / "recipes" / JOBS[job][1]
    raw = OmegaConf.load(path)
    if "base" in raw and not str(raw.base).startswith("_"):  # a recipe built on another (not on a zoo's problem)
        raw = OmegaConf.merge(OmegaConf.load(path.parent / raw.base), raw)
    sections = OmegaConf.to_container(raw)
    for key in ("name", "base", "problem"):
        sections.pop(key, None)
    tasks = {f"task{k}": {"expert": str(folder / f"e{k}"), "calibration": {"path": str(folder / f"task{k}.jsonl")},
                          "text": "prompt", "response": "response"} for k in range(experts)}
    problem = {"kind": "hf_causal_lm", "pretrained": str(folder / "base"), "max_length": 64, "tasks": tasks}
    overrides = [f"output_dir={folder / 'runs' / job}", "trainer.progress_bar=false", "export.plot=false",
                 "export.mergekit=false", "evaluation.enabled=false"]
    if job == "wudi":
        overrides.append(f"method.args.iterations={wudi_iterations}")
    if job in ("streamed_wudi", "expert_kl", "streamed_expert_kl"):
        overrides.append(f"task_vectors.start.args.iterations={wudi_iterations}")
    if job == "streamed_wudi":
        overrides.append("progressive.epochs=1")
    if job in ("expert_kl", "streamed_expert_kl"):
        overrides += ["trainer.max_steps=2", "trainer.checkpoint_every_n_steps=2"]
    return load_recipe({"name": f"llama3-{job}", **sections, "problem": problem}, overrides)


def child(job: str, folder: Path, experts: int, wudi_iterations: int) -> dict:
    """The job on a tiny zoo first (what the libraries load on first use goes into the baseline),
    then on the measured one."""
    import adamerge.app.runner as runner

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(dir=folder) as warm:
        make_zoo(Path(warm), 512, 128, 1, experts, "200MB")
        getattr(runner, JOBS[job][0])(recipe_for(job, Path(warm), experts, 1))
    recipe = recipe_for(job, folder, experts, wudi_iterations)
    baseline = reset_peak_rss()
    started = time.perf_counter()
    getattr(runner, JOBS[job][0])(recipe)
    return {"peak_mb": rss_mb("VmHWM") - baseline, "baseline_mb": baseline, "seconds": time.perf_counter() - started}


def shape_of(args) -> Shape:
    heads = args.hidden // 64
    return Shape(args.vocab, args.hidden, int(3.5 * args.hidden), args.layers, heads, max(1, heads // 4), args.experts)


def measured_table(shape: Shape, rows: list[dict]) -> list[str]:
    lines = [
        f"Llama (vocabulary {shape.vocab:,}, hidden {shape.hidden}, {shape.layers} layers, untied head: "
        f"{shape.total / 1e6:.1f} M parameters, float32), K = {shape.experts} experts as sharded safetensors; "
        f"U = one {shape.vocab} x {shape.hidden} float32 matrix = {shape.head * 4 / MiB:.1f} MiB; MiB, fresh process each.",
        "",
        "| job | recipe | peak + | formula | measured / formula | the formula's peak | its terms (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        candidates = phases(shape, 4, 4, 2)[row["job"]]
        name, predicted = peak(candidates)
        terms = ", ".join(f"{term} {value / MiB:.0f}" for term, value in candidates[name].items())
        lines.append(f"| {row['job']} | `recipes/{JOBS[row['job']][1]}` | {row['peak_mb']:.0f} | {predicted / MiB:.0f} | "
                     f"{row['peak_mb'] * MiB / predicted:.2f} | {name} | {terms} |")
    return lines


def large_table() -> list[str]:
    lines = [
        "The formulas at real shapes (bf16 weights and task vectors, float32 solves; K = T = 4, 64 rows x 512 tokens "
        "per task, 4 predicted); GB, activations aside.",
        "",
        "| model | parameters | largest tensor | WUDI merge | TSV-M merge | streamed from WUDI | streamed | "
        "streamed expert KL from WUDI | all at once from WUDI |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, base in LARGE.items():
        shape = replace(base, **LARGE_RUN)
        jobs = phases(shape, 2, 2, 2)
        cells = []
        for job in ("wudi", "tsv", "streamed_wudi", "streamed", "streamed_expert_kl", "expert_kl"):
            name, predicted = peak(jobs[job])
            cells.append(f"{predicted / GB:.0f} ({name})" if len(jobs[job]) > 1 else f"{predicted / GB:.0f}")
        lines.append(f"| {model} | {shape.total / 1e9:.2f} B | {shape.head / 1e6:.0f} M | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    if argv and argv[0] == "--child":
        job, folder, experts, iterations = argv[1:]
        print(json.dumps(child(job, Path(folder), int(experts), int(iterations))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256, help="vocabulary (Llama-3: 128,256)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--jobs", nargs="+", choices=list(JOBS), default=list(JOBS))
    parser.add_argument("--wudi-iterations", type=int, default=100, help="WUDI's Adam steps per matrix (as the recipes)")
    parser.add_argument("--shard", default="200MB", help="save_pretrained's max_shard_size for every checkpoint")
    parser.add_argument("--out", type=Path, default=Path("runs/llama3-memory"))
    parser.add_argument("--formulas-only", action="store_true", help="print the formulas at real shapes, run nothing")
    args = parser.parse_args(argv)
    if args.formulas_only:
        print("\n".join(large_table()))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.out) as folder:
        make_zoo(Path(folder), args.vocab, args.hidden, args.layers, args.experts, args.shard)
        for job in args.jobs:
            rows.append({"job": job, **in_fresh_process(__file__, job, folder, str(args.experts), str(args.wudi_iterations))})
            print(json.dumps(rows[-1]), flush=True)
    lines = [*measured_table(shape_of(args), rows), "", *large_table()]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
