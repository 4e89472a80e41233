"""Padding-free packing: rows hold several sequences, and every sequence's embedding, logits and
gradients are those of the padded forward (to float round-off)."""

from __future__ import annotations

import pytest
import torch

from mergeflow.zoo.packing import first_fit_decreasing, mean_pool, pack
from mergeflow.zoo.text_evaluator import TextEvaluator
from mergeflow.zoo.text_model import load_text_encoder

TEXTS = [
    "a cat", "the quick brown fox jumps over the lazy dog near the river bank", "hello",
    "Der schnelle braune Fuchs springt über den faulen Hund", "one two three four five six seven",
    "x", "a sentence of medium length about merging models", "¿dónde está la biblioteca?",
]  # fmt: skip


def test_first_fit_decreasing_places_every_sequence_once_within_the_width() -> None:
    lengths = [5, 9, 3, 12, 1, 7, 7, 2, 12, 4]
    rows = first_fit_decreasing(lengths, 12)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 12 for row in rows)
    assert len(rows) == 6  # ⌈62 / 12⌉ = 6: nothing wasted beyond what the lengths force
    with pytest.raises(ValueError, match="13 tokens"):
        first_fit_decreasing([13], 12)


def test_a_packed_row_keeps_each_sequence_to_itself() -> None:
    packed = pack([{"input_ids": torch.tensor([7, 8, 9])}, {"input_ids": torch.tensor([5, 6])}], width=8, pad_id=0)
    assert packed.inputs["input_ids"].tolist() == [[7, 8, 9, 5, 6, 0, 0, 0]]
    assert packed.inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0, 0]]
    mask = packed.inputs["attention_mask"][0, 0]
    assert mask[:3, :3].all() and mask[3:5, 3:5].all() and not mask[:3, 3:].any() and not mask[3:5, :3].any()
    assert torch.equal(mask[5:, 5:], torch.eye(3, dtype=torch.bool))  # unused positions: themselves only
    assert mask.any(1).all()  # no query without a key (no softmax over nothing)
    hidden = torch.arange(8.0).reshape(1, 8, 1)
    assert mean_pool(hidden, packed).flatten().tolist() == [1.0, 3.5]


@pytest.fixture(scope="module")
def engine() -> TextEvaluator:
    """A TextEvaluator over a 2-layer cut of MiniLM with two random heads (no zoo needed)."""
    evaluator = TextEvaluator.__new__(TextEvaluator)
    evaluator.encoder = load_text_encoder(layers=2, max_length=32)
    g = torch.Generator().manual_seed(0)
    evaluator.heads = {"a": torch.randn(3, 384, generator=g) * 5, "b": torch.randn(4, 384, generator=g) * 5}
    evaluator.tasks, evaluator.batch_size, evaluator._batches, evaluator._loaded = ["a", "b"], 64, {}, None
    return evaluator


def _unpadded(inputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    lengths = inputs["attention_mask"].sum(1).tolist()
    return [{k: inputs[k][i, :n] for k in ("input_ids", "token_type_ids")} for i, n in enumerate(lengths)]


def test_packed_embeddings_are_the_padded_ones(engine: TextEvaluator) -> None:
    padded = engine.encoder.tokenize(TEXTS)
    with torch.no_grad():
        want = engine.embed(dict(padded))
        got = engine.embed_packed(_unpadded(padded))
        alone = torch.cat([engine.embed_packed(_unpadded(padded)[i : i + 1]) for i in range(len(TEXTS))])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    torch.testing.assert_close(got, alone, rtol=0, atol=2e-6)  # neighbours in a row change nothing


def test_logits_many_gives_logits_with_and_its_gradients(engine: TextEvaluator) -> None:
    batches = [("a", dict(engine.encoder.tokenize(TEXTS[:5]))), ("b", dict(engine.encoder.tokenize(TEXTS[3:])))]
    model = engine.module
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    many = engine.logits_many(batches, params)
    one = [engine.logits_with(task, inputs, params) for task, inputs in batches]
    for got, want in zip(many, one, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    key = "encoder.layer.0.attention.self.query.weight"
    (grad_many,) = torch.autograd.grad(sum(x.logsumexp(-1).sum() for x in many), params[key])
    (grad_one,) = torch.autograd.grad(sum(x.logsumexp(-1).sum() for x in one), params[key])
    torch.testing.assert_close(grad_many, grad_one, rtol=1e-4, atol=1e-5)
