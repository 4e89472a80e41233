"""AdaMerging: the combination formula, the entropy, the CART vectors, determinism and clipping."""

from __future__ import annotations

import math

import pytest
import torch

from mergeflow.adamerging import AdaMergingParams, adamerge, adaptation_vectors, combine, entropy
from mergeflow.errors import ConfigError
from tests.helpers import LAYOUTS, random_state_dicts


def _toy() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base, tuned = random_state_dicts(LAYOUTS["open_clip"](), tasks=3, seed=1, dtype=torch.float32)
    return base, tuned


def test_task_arithmetic_coefficients_of_one_over_t_give_the_weight_average() -> None:
    base, tuned = _toy()
    anchor, vectors = adaptation_vectors(AdaMergingParams(), base, tuned)
    lam = {k: torch.full((3,), 1 / 3) for k in vectors[0]}
    merged = combine(anchor, vectors, lam, (0.0, 1.0))
    for key, value in base.items():
        if value.is_floating_point():
            want = torch.stack([t[key].double() for t in tuned]).mean(0)
            assert torch.allclose(merged[key].double(), want, atol=1e-6), key


def test_cart_vectors_are_low_rank_centred_and_full_rank_sums_to_zero() -> None:
    base, tuned = _toy()
    anchor, vectors = adaptation_vectors(AdaMergingParams(over="cart", rank_ratio=0.25), base, tuned)
    key = "model.visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert set(vectors[0]) and all("attn" in k or "mlp" in k for k in vectors[0])
    assert "model.visual.proj" not in vectors[0] and "model.visual.positional_embedding" not in vectors[0]
    k = max(1, int(0.25 * min(base[key].shape)))
    assert int(torch.linalg.matrix_rank(vectors[0][key].double(), rtol=1e-4)) == k
    want = torch.linalg.svd(tuned[0][key].double() - anchor[key].double(), full_matrices=False)
    assert (vectors[0][key].double() - (want.U[:, :k] * want.S[:k]) @ want.Vh[:k]).abs().max() < 1e-4
    _, full = adaptation_vectors(AdaMergingParams(over="cart", rank_ratio=1.0), base, tuned)
    assert sum(v[key] for v in full).abs().max() < 1e-5  # centred vectors sum to zero


def test_entropy_of_uniform_and_certain_predictions() -> None:
    assert entropy(torch.zeros(4, 5)).item() == pytest.approx(math.log(5))
    assert entropy(torch.tensor([[50.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-12)


def _problem(seed: int = 0):
    """Two 'tasks' whose predictions come from a linear map of merged weights: entropy can fall."""
    g = torch.Generator().manual_seed(seed)
    anchor = {"w": torch.randn(4, 6, generator=g)}
    vectors = [{"w": torch.randn(4, 6, generator=g)} for _ in range(2)]
    inputs = [torch.randn(32, 6, generator=g) for _ in range(2)]

    def task_logits(state, step, generator):
        rows = torch.randint(32, (8,), generator=generator)
        return [x[rows] @ state["w"].T for x in inputs]

    return anchor, vectors, task_logits


def test_adaptation_lowers_entropy_is_deterministic_and_respects_the_clip() -> None:
    anchor, vectors, task_logits = _problem()
    params = AdaMergingParams(steps=200, lr=0.05, seed=3, batch_size=8)
    merged, lam, history = adamerge(anchor, vectors, task_logits, params)
    again = adamerge(anchor, vectors, task_logits, params)
    assert torch.equal(merged["w"], again[0]["w"]) and history == again[2]  # same seed, same result
    assert sum(history[-20:]) < sum(history[:20])
    assert all(0.0 <= float(x) <= 1.0 for x in lam["w"])
    assert torch.allclose(merged["w"], anchor["w"] + sum(lam["w"][t] * vectors[t]["w"] for t in range(2)))
    untouched, init, _ = adamerge(anchor, vectors, task_logits, AdaMergingParams(steps=0, init=0.3))
    assert torch.allclose(init["w"], torch.full((2,), 0.3))
    assert torch.allclose(untouched["w"], anchor["w"] + 0.3 * (vectors[0]["w"] + vectors[1]["w"]))


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="lower bound"):
        AdaMergingParams(clip=(1.0, 0.0))
    with pytest.raises(ValueError):
        AdaMergingParams(over="ties")
