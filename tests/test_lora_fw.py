"""A cross-cutting suite (io/lora with learning/frank_wolfe): FW-Merging with pool members given as
PEFT LoRA adapter folders walks as with the equivalent full experts (θ_0 + ΔW, merged by peft's
merge_and_unload and saved as a normal model)."""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")

from adamerge.io.checkpoints import save_safetensors  # noqa: E402
from adamerge.learning.data import CalibrationData  # noqa: E402
from adamerge.learning.frank_wolfe import frank_wolfe_merge  # noqa: E402
from adamerge.objectives import build_objective  # noqa: E402
from adamerge.tasks.base import HeadTask  # noqa: E402
from fixtures.families import make_mlp, perturbed  # noqa: E402


def lora_member(base, folder, seed: int) -> str:
    """An adapter on the MLP's Linear layers "0" and "4" with seeded factors, saved by peft; and
    beside it the full expert peft merges from it, as a plain safetensors file. Returns that file."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "4"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.5 * torch.randn_like(param))
    model.save_pretrained(folder)
    full = folder.parent / f"{folder.name}_full.safetensors"
    save_safetensors({k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}, full)
    return str(full)


def pools(tmp_path):
    """The same three members twice: two as adapter folders (and a full model), or all three full."""
    pretrained = make_mlp()
    full = {name: lora_member(pretrained, tmp_path / name, seed) for name, seed in (("a", 1), ("b", 2))}
    other = perturbed(pretrained, seed=7, scale=0.3)
    adapters = {"a": str(tmp_path / "a"), "b": str(tmp_path / "b"), "c": other}
    return pretrained, adapters, {**full, "c": other}


def run(pretrained, pool, **options):
    rows = [{"inputs": torch.randn(6, generator=torch.Generator().manual_seed(i))} for i in range(32)]
    data = CalibrationData({"t": rows}, batch_size=8)
    return frank_wolfe_merge(copy.deepcopy(pretrained), pool, {"t": HeadTask("t")}, data, build_objective("entropy"),
                             batches_per_iteration=1, **options)


@pytest.mark.parametrize("options", [
    dict(mode="hard", iterations=3, start="task_arithmetic", start_scaling=0.4),
    dict(mode="hard", iterations=3, lmo="tensor"),
    dict(mode="soft", iterations=2, directions=2, inner_steps=3, inner_lr=0.1),
    dict(mode="soft", iterations=2, lmo="tensor", directions=2, inner_steps=3, inner_lr=0.1),
], ids=["hard-task-arithmetic-start", "hard-tensor", "soft-model", "soft-tensor"])
def test_fw_with_adapter_folders_equals_fw_with_the_merged_experts(tmp_path, options):
    pretrained, adapters, full = pools(tmp_path)
    with_adapters, with_full = run(pretrained, adapters, **options), run(pretrained, full, **options)
    moved = False
    for key, tensor in with_full.merged_parameters().items():
        torch.testing.assert_close(with_adapters.merged_parameters()[key], tensor, rtol=0, atol=1e-5, msg=key)
        moved = moved or not torch.allclose(tensor, pretrained.state_dict()[key])
    assert moved
    chosen = [record["chosen"] for record in with_full.history]
    assert [record["chosen"] for record in with_adapters.history] == chosen
    assert any("a" in str(c) or "b" in str(c) for c in chosen)  # an adapter member was walked toward
    for mine, reference in zip(with_adapters.history, with_full.history):
        assert mine["scores"] == pytest.approx(reference["scores"], rel=1e-4, abs=1e-6)
