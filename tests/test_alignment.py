"""Expert alignment's targets (adamerge.objectives.alignment): the top-k KL against the full KL,
checked by hand on small logits."""

from __future__ import annotations

import pytest
import torch

from adamerge.objectives.alignment import ExpertKL, kl_to_teacher, top_k_kl, top_k_targets


def logits(rows=5, vocab=11, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_with_every_token_kept_it_is_the_full_kl(temperature):
    student, teacher = logits(seed=1), logits(seed=2)
    values, indices = top_k_targets(teacher, k=teacher.shape[-1], temperature=temperature)
    torch.testing.assert_close(top_k_kl(student, values, indices, temperature),
                               kl_to_teacher(student, teacher, temperature), rtol=1e-5, atol=1e-6)


def test_with_k_tokens_it_is_the_kl_of_the_k_tokens_and_one_bucket_for_the_rest():
    student, teacher, k = logits(seed=3), logits(seed=4), 3
    values, indices = top_k_targets(teacher, k)
    assert values.shape == indices.shape == (5, k) and indices.dtype == torch.int32
    p, q = teacher.softmax(-1), student.softmax(-1)
    by_hand = 0.0
    for row in range(5):
        top = p[row].topk(k).indices
        p_coarse = torch.cat([p[row, top], (1 - p[row, top].sum())[None]])
        q_coarse = torch.cat([q[row, top], (1 - q[row, top].sum())[None]])
        by_hand += (p_coarse * (p_coarse.log() - q_coarse.log())).sum() / 5
    torch.testing.assert_close(top_k_kl(student, values, indices), by_hand, rtol=1e-5, atol=1e-6)
    assert top_k_kl(teacher, values, indices) < 1e-6  # the teacher against itself
    assert 0 <= top_k_kl(student, values, indices) <= kl_to_teacher(student, teacher) + 1e-6  # coarse-graining loses information


def test_expert_kl_keeps_k_values_and_indices_per_row(mlp_problem):
    from adamerge.objectives.base import ObjectiveContext

    merged, tasks, data = mlp_problem()
    batches = lambda name: [{"inputs": torch.stack([r["inputs"] for r in data[name]]), "index": torch.arange(len(data[name]))}]  # noqa: E731
    objective = ExpertKL(top_k=2)
    objective.setup(ObjectiveContext(merged, tasks, batches, torch.device("cpu")))
    targets = objective.targets["t0"]
    assert [t.shape for t in targets["logits"][:2]] == [(1, 2), (1, 2)] and targets["indices"][0].dtype == torch.int32
    batch = batches("t0")[0]
    loss, logs = objective(tasks["t0"](merged, merged.merged_parameters(), batch), batch, "t0")
    assert loss >= 0 and "kl" in logs
    with pytest.raises(ValueError, match="top_k must be a positive number of tokens"):
        ExpertKL(top_k=0)
