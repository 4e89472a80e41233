"""Singular-value kernels: the Gram/Rayleigh-Ritz solver against LAPACK, rank rule, polar factor."""

from __future__ import annotations

import pytest
import torch

from mergeflow.linalg import low_rank, polar, rank_from_ratio, top_svd


def decaying(m: int, n: int, seed: int = 0, scale: float = 60.0) -> torch.Tensor:
    """A matrix with a slowly decaying spectrum and tiny gaps (the hard case for Gram methods)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    s = torch.exp(-torch.arange(min(m, n), dtype=torch.float64) / scale)
    s = s + 1e-3 * torch.rand(min(m, n), generator=g, dtype=torch.float64)
    s = s.sort(descending=True).values
    return (u * s) @ v.T


@pytest.mark.parametrize("shape", [(600, 200), (200, 600), (300, 300)])
def test_gram_solver_float32_is_as_accurate_as_lapack(shape: tuple[int, int]) -> None:
    a64 = decaying(*shape)
    k = 24
    exact = low_rank(a64, k, "full")
    a32 = a64.float()
    err = {}
    for solver in ("gram", "full"):
        approx = low_rank(a32, k, solver).double()
        err[solver] = ((approx - exact).norm() / exact.norm()).item()
    # the Gram route must not be meaningfully worse than float32 LAPACK on an ill-separated spectrum
    assert err["gram"] <= max(3 * err["full"], 1e-6), err


@pytest.mark.parametrize("shape", [(50, 30), (30, 50)])
def test_top_svd_triplets_are_orthonormal_and_reconstruct(shape: tuple[int, int]) -> None:
    a = decaying(*shape, seed=3, scale=5.0)
    u, s, vh = top_svd(a, 4, "gram")
    assert u.shape == (shape[0], 4) and vh.shape == (4, shape[1])
    torch.testing.assert_close(u.T @ u, torch.eye(4, dtype=a.dtype), atol=1e-10, rtol=0)
    torch.testing.assert_close(vh @ vh.T, torch.eye(4, dtype=a.dtype), atol=1e-10, rtol=0)
    torch.testing.assert_close(s, torch.linalg.svdvals(a)[:4], atol=1e-12, rtol=0)


def test_low_rank_extremes() -> None:
    a = torch.randn(7, 5, dtype=torch.float64)
    assert torch.count_nonzero(low_rank(a, 0)) == 0
    torch.testing.assert_close(low_rank(a, 5), a)
    assert torch.linalg.matrix_rank(low_rank(a, 2)) == 2


def test_rank_rule_matches_cart_reference() -> None:
    assert rank_from_ratio(0.12, (3072, 768)) == 92
    assert rank_from_ratio(0.001, (10, 10)) == 1  # floor would be 0: at least one
    assert rank_from_ratio(0.0, (10, 10)) == 0
    assert rank_from_ratio(1.0, (3, 8)) == 3
    assert rank_from_ratio(0.29, (100, 100)) == int(0.29 * 100)  # plain float product, then floor


def test_polar_is_orthogonal_and_nearest() -> None:
    a = torch.randn(9, 4, dtype=torch.float64)
    q = polar(a)
    torch.testing.assert_close(q.T @ q, torch.eye(4, dtype=torch.float64))
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(q, u @ vh)
