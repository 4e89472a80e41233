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
    lam = {k: torch.full((3,), 1 / 3) for k in vectors}
    merged = combine(anchor, vectors, lam, (0.0, 1.0))
    for key, value in base.items():
        if value.is_floating_point():
            want = torch.stack([t[key].double() for t in tuned]).mean(0)
            assert torch.allclose(merged[key].double(), want, atol=1e-6), key


def test_cart_vectors_are_low_rank_centred_and_full_rank_sums_to_zero() -> None:
    base, tuned = _toy()
    anchor, vectors = adaptation_vectors(AdaMergingParams(over="cart", rank_ratio=0.25), base, tuned)
    key = "model.visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert set(vectors) and all("attn" in k or "mlp" in k for k in vectors)
    assert "model.visual.proj" not in vectors and "model.visual.positional_embedding" not in vectors
    k = max(1, int(0.25 * min(base[key].shape)))
    assert vectors[key].shape == (3, *base[key].shape)
    assert int(torch.linalg.matrix_rank(vectors[key][0].double(), rtol=1e-4)) == k
    want = torch.linalg.svd(tuned[0][key].double() - anchor[key].double(), full_matrices=False)
    assert (vectors[key][0].double() - (want.U[:, :k] * want.S[:k]) @ want.Vh[:k]).abs().max() < 1e-4
    _, full = adaptation_vectors(AdaMergingParams(over="cart", rank_ratio=1.0), base, tuned)
    assert full[key].sum(0).abs().max() < 1e-5  # centred vectors sum to zero


def test_entropy_of_uniform_and_certain_predictions() -> None:
    assert entropy(torch.zeros(4, 5)).item() == pytest.approx(math.log(5))
    assert entropy(torch.tensor([[50.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-12)


def _problem(seed: int = 0):
    """Two 'tasks' whose predictions come from a linear map of merged weights: entropy can fall."""
    g = torch.Generator().manual_seed(seed)
    anchor = {"w": torch.randn(4, 6, generator=g)}
    vectors = {"w": torch.randn(2, 4, 6, generator=g)}  # two tasks' vectors, stacked
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
    assert torch.allclose(merged["w"], anchor["w"] + sum(lam["w"][t] * vectors["w"][t] for t in range(2)))
    untouched, init, _ = adamerge(anchor, vectors, task_logits, AdaMergingParams(steps=0, init=0.3))
    assert torch.allclose(init["w"], torch.full((2,), 0.3))
    assert torch.allclose(untouched["w"], anchor["w"] + 0.3 * (vectors["w"][0] + vectors["w"][1]))


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="lower bound"):
        AdaMergingParams(clip=(1.0, 0.0))
    with pytest.raises(ValueError):
        AdaMergingParams(over="ties")


def test_combine_and_its_gradient_are_the_formula_in_float64() -> None:
    g = torch.Generator().manual_seed(5)
    anchor = {"w": torch.randn(5, 7, generator=g), "b": torch.randn(7, generator=g)}
    vectors = {"w": torch.randn(3, 5, 7, generator=g), "b": torch.randn(3, 7, generator=g)}
    lam = {"w": torch.tensor([0.2, 0.7, 1.4]), "b": torch.tensor([-0.5, 0.4, 0.9])}
    lam = {k: v.requires_grad_(True) for k, v in lam.items()}
    weight = {k: torch.randn(v.shape, generator=g) for k, v in anchor.items()}
    merged = combine(anchor, vectors, lam, (0.0, 1.0))
    sum((merged[k] * weight[k]).sum() for k in merged).backward()
    for key in anchor:
        clipped = lam[key].detach().double().clamp(0.0, 1.0)
        want = anchor[key].double() + sum(clipped[t] * vectors[key][t].double() for t in range(3))
        assert (merged[key].double() - want).abs().max() < 1e-5
        inside = (lam[key].detach() > 0.0) & (lam[key].detach() < 1.0)  # the clip passes no gradient outside
        grad = torch.stack([(weight[key].double() * vectors[key][t].double()).sum() for t in range(3)]) * inside
        torch.testing.assert_close(lam[key].grad.double(), grad, rtol=1e-5, atol=1e-5)
