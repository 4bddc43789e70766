"""LoRA task vectors kept low-rank inside the merge: the factored stack, the task vectors that
hold it, and the merged model that merges from it, each against the dense computation."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from adamerge import MergedModel, TaskVectors  # noqa: E402
from adamerge.core.low_rank import LowRankStack, merge_low_rank  # noqa: E402

ADAPTERS = {  # two LoRA experts of different ranks and targets, one rsLoRA
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "b": dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "o_proj", "up_proj"]),
}
Q = "model.layers.0.self_attn.q_proj.weight"


def test_stack_is_the_sum_of_each_experts_factors_by_hand():
    torch.manual_seed(0)
    pairs = [(torch.randn(5, 2), torch.randn(2, 3)), None, (torch.randn(5, 3), torch.randn(3, 3))]
    stack = LowRankStack.from_factors(pairs, (5, 3))
    assert stack.shape == (3, 5, 3) and stack.rank == 5
    assert stack.owner.tolist() == [0, 0, 2, 2, 2]
    dense = stack.dense()
    torch.testing.assert_close(dense[0], pairs[0][0] @ pairs[0][1])
    assert torch.equal(dense[1], torch.zeros(5, 3))
    torch.testing.assert_close(dense[2], pairs[2][0] @ pairs[2][1])
    assert stack.nbytes() == 5 * (5 + 3) * 4 + 5 * 8  # Σr (m + n) float32 numbers + the owners


def test_stack_refuses_factors_of_another_matrix():
    with pytest.raises(ValueError, match=r"expert 1's factors \(4, 2\) @ \(2, 3\) do not make the 5x3 matrix"):
        LowRankStack.from_factors([None, (torch.zeros(4, 2), torch.zeros(2, 3))], (5, 3))


@pytest.fixture(scope="module")
def lora_zoo(tiny_llama, write_adapter, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    base = tiny_llama()
    for seed, (name, config) in enumerate(ADAPTERS.items(), start=1):
        write_adapter(base, folder / name, seed=seed, **config)
    return base, {name: str(folder / name) for name in ADAPTERS}


def test_a_bf16_base_gets_the_float32_sum_rounded_once_and_float32_gradients(bf16_sum_case):
    base, taus, c, expected = bf16_sum_case
    left = torch.eye(3, dtype=torch.bfloat16).repeat(1, 2)  # τ_k = I · τ_k: [I I] @ [τ_0; τ_1]
    right, owner = taus.reshape(6, 4), torch.tensor([0, 0, 0, 1, 1, 1])
    row_coefficients = c.expand(3, 2).clone().requires_grad_()
    merged = merge_low_rank(base, left, right, owner, row_coefficients)
    assert merged.dtype == torch.bfloat16 and torch.equal(merged, expected)
    grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    merged.backward(grad)
    by_hand = (taus.double() * grad.double()).sum(dim=2).t()  # [rows, K]
    assert row_coefficients.grad.dtype == torch.float32
    torch.testing.assert_close(row_coefficients.grad.double(), by_hand, rtol=1e-6, atol=1e-7)


def test_lora_experts_stay_factored_and_equal_the_dense_vectors(lora_zoo, tmp_path):
    base, experts = lora_zoo
    low, dense = TaskVectors.from_models(base, experts), TaskVectors.from_models(base, experts, low_rank=False)
    assert low.low_rank(Q) is not None and low.low_rank(Q).rank == 4 + 2  # both experts adapt q_proj
    assert low.low_rank("model.layers.0.mlp.down_proj.weight").rank == 4  # only "a" does
    assert low.low_rank("model.norm.weight") is None  # not a matrix: dense (zero)
    assert dense.low_rank(Q) is None
    for key in dense.keys:
        assert low.shape(key) == dense.shape(key)
        torch.testing.assert_close(low[key], dense[key], rtol=1e-5, atol=1e-6, msg=key)
    assert low.nbytes() < dense.nbytes() / 2
    low.save(tmp_path / "tv.safetensors")
    loaded = TaskVectors.load(tmp_path / "tv.safetensors")
    assert loaded.low_rank(Q) is not None and torch.equal(loaded.low_rank(Q).left, low.low_rank(Q).left)
    assert torch.equal(loaded[Q], low[Q])


def test_a_full_expert_among_lora_ones_makes_every_vector_dense(tiny_llama, lora_zoo):
    base, experts = lora_zoo
    full = tiny_llama(seed=3)
    tv = TaskVectors.from_models(base, {**experts, "full": full})
    assert all(tv.low_rank(key) is None for key in tv.keys)


def _loss(model):
    ids = torch.tensor([[1, 4, 2, 7, 3]])
    return model(input_ids=ids).logits.square().mean()


@pytest.mark.parametrize("granularity, chunks", [("layer", None), ("chunk", 3), ("task", None), ("element", None)])
def test_low_rank_merge_and_gradients_equal_the_dense_merge(lora_zoo, granularity, chunks):
    base, experts = lora_zoo
    models = {}
    for low_rank in (True, False):
        tv = TaskVectors.from_models(base, experts, low_rank=low_rank)
        models[low_rank] = MergedModel(base, tv, granularity, init=0.4, chunks=chunks)
        with torch.no_grad():  # distinct coefficients everywhere, the same in both models
            raw = models[low_rank].coefficients.raw if granularity != "element" else None
            if raw is not None:
                raw.copy_(torch.linspace(0.1, 0.9, raw.numel()).view_as(raw))
    low, dense = models[True], models[False]
    for key, tensor in dense.merged_parameters().items():
        torch.testing.assert_close(low.merged_parameters()[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    grads = {}
    for low_rank, model in models.items():
        _loss(model).backward()
        grads[low_rank] = [p.grad.clone() for p in model.coefficients.parameters() if p.grad is not None]
    for g_low, g_dense in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(g_low, g_dense, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads[True])
    for expert in experts:
        for key, tensor in dense.expert_parameters(expert).items():
            torch.testing.assert_close(low.expert_parameters(expert)[key], tensor, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(low.task_vector(Q), dense.task_vector(Q), rtol=1e-5, atol=1e-6)


def test_an_adapter_opened_over_other_weights_is_read_as_the_model_it_makes(tiny_llama, lora_zoo):
    """τ = θ_k − θ_0 whatever an expert is: an adapter opened over weights other than the
    pretrained model's is ``its base + ΔW``, not ΔW (and so not kept low-rank)."""
    from adamerge.io.lora import open_adapter

    base, experts = lora_zoo
    opened = open_adapter(experts["a"], tiny_llama(seed=5).state_dict())
    tv = TaskVectors.from_models(base, {"a": opened})
    assert tv.low_rank(Q) is None
    for key, tensor in base.state_dict().items():
        if key in tv:
            torch.testing.assert_close(tv[key][0], opened[key].float() - tensor.float(), msg=key)
    same = TaskVectors.from_models(base, {"a": open_adapter(experts["a"], base.state_dict())})
    assert same.low_rank(Q) is not None


def test_progressive_distillation_learns_the_same_from_factors_as_from_dense_vectors(lora_zoo):
    """Each stage reads its LoRA task vectors factored unless ``low_rank=False``; both learn the same."""
    from adamerge.core.coefficients import MergeCoefficients
    from adamerge.core.layouts import build_layout
    from adamerge.learning.progressive import ProgressiveDistiller
    from adamerge.tasks.hf import CausalLMTask

    base, experts = lora_zoo
    keys = [name for name, _ in base.named_parameters()]
    shapes = {name: tuple(p.shape) for name, p in base.named_parameters()}
    ids = torch.tensor([[1, 4, 2, 7, 3], [2, 2, 5, 1, 6]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
    learned, built = {}, []
    original = TaskVectors.from_models

    def spy(*args, **kwargs):
        vectors = original(*args, **kwargs)
        built.append((kwargs["low_rank"], any(vectors.low_rank(k) is not None for k in vectors.keys)))
        return vectors

    for low_rank in (True, False):
        coefficients = MergeCoefficients(build_layout(list(experts), shapes, "layer"), init=0.3)
        distiller = ProgressiveDistiller(
            base, experts, {name: CausalLMTask(name) for name in experts}, {name: [batch] for name in experts},
            coefficients, keys=keys, epochs=3, lr=0.05, progress=False, low_rank=low_rank,
        )
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(TaskVectors, "from_models", spy)
            learned[low_rank] = distiller.run().coefficients.raw.detach().clone()
    assert (True, True) in built
    assert not any(factored for low_rank, factored in built if not low_rank)
    assert not torch.allclose(learned[True], torch.full_like(learned[True], 0.3))  # it learned
    torch.testing.assert_close(learned[True], learned[False], rtol=1e-4, atol=1e-5)
