"""Truncated SVDs exact to float round-off at every rank ratio, on task vectors shaped like the text zoo's.

Data: T = 4 fine-tunes θt = θ0 + τt with weights of RMS 0.05 and task vectors of RMS 2.5e-4 whose
spectrum decays like the zoo's (σ_i ∝ (1 + i)^-0.7 plus a noise floor; benchmarks/bench_svd_accuracy.py).
For the solver tests τ̄t = θt − θ_avg is centred in float64 and rounded to float32, so every solver sees
the same exact float32 input; the reference is LAPACK float64 on that input. The bar is LAPACK float32's
own error: the default solver may not exceed it by more than ``FACTOR`` at any rank ratio.
"""

from __future__ import annotations

import pytest
import torch

from mergeflow.linalg import GRAM_MAX_RANK_RATIO, eigh, low_rank, oversampling, polar, svd, top_svd, uses_gram
from mergeflow.methods.cart import cart_low_rank_sum, cart_low_rank_sums, centred_task_vectors, task_low_rank_parts

RATIOS = (0.01, 0.02, 0.05, 0.08, 0.12, 0.16, 0.2, 0.25, 0.3, 0.32, 0.33, 0.34, 0.4, 0.5, 0.6, 0.75, 0.9, 0.99)
SHAPES = {"square": (384, 384), "wide": (384, 1536)}
FACTOR = 2.0
TASKS = 4


def zoo_like_task_vector(m: int, n: int, g: torch.Generator, rms: float = 2.5e-4) -> torch.Tensor:
    """U diag(σ) Vᵀ + noise, σ_i = (1 + i)^-0.7, random orthonormal U, V, scaled to RMS entry ``rms``."""
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    s = (1.0 + torch.arange(r, dtype=torch.float64)) ** -0.7
    a = (u * s) @ v.T + 0.02 * torch.randn(m, n, generator=g, dtype=torch.float64) / max(m, n) ** 0.5
    return a * (rms / a.pow(2).mean().sqrt())


def fine_tunes(m: int, n: int, seed: int) -> torch.Tensor:
    """T × m × n float32 fine-tuned weights θ0 + τt (exact in float32)."""
    g = torch.Generator().manual_seed(seed)
    theta0 = 0.05 * torch.randn(m, n, generator=g, dtype=torch.float64)
    return torch.stack([theta0 + zoo_like_task_vector(m, n, g) for _ in range(TASKS)]).to(torch.float32)


def lapack32_factors(a: torch.Tensor, transpose: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LAPACK float32 SVD of ``a``, or of ``aᵀ`` with the factors transposed back."""
    if not transpose:
        return torch.linalg.svd(a, full_matrices=False)
    u, s, vh = torch.linalg.svd(a.mT, full_matrices=False)
    return vh.mT, s, u.mT


class Case:
    """Centred float32 task vectors of one shape with their float64 and float32 LAPACK factors.

    LAPACK float32's own error is that of its worse orientation (``A`` or ``Aᵀ``): at a near-degenerate
    cut k the two differ by up to ≈ 8× on these matrices, and the library factorizes the tall side.
    """

    def __init__(self, m: int, n: int, seed: int) -> None:
        self.thetas = fine_tunes(m, n, seed)
        wide = self.thetas.to(torch.float64)
        self.centred = (wide - wide.mean(dim=0)).to(torch.float32)  # exact float32 input for every solver
        self.exact = [torch.linalg.svd(t.to(torch.float64), full_matrices=False) for t in self.centred]
        self.lapack32 = [[lapack32_factors(t, transpose) for t in self.centred] for transpose in (False, True)]
        self._references: dict[int, torch.Tensor] = {}
        self._bars: dict[int, float] = {}

    def rank(self, ratio: float) -> int:
        return max(1, int(ratio * min(self.centred.shape[-2:])))

    def reference(self, k: int) -> torch.Tensor:
        """Σt SVD_k(τ̄t) by LAPACK float64."""
        if k not in self._references:
            self._references[k] = truncated_sum(self.exact, k)
        return self._references[k]

    def bar(self, k: int) -> float:
        """LAPACK float32's relative error on Σt SVD_k(τ̄t) (worse orientation)."""
        if k not in self._bars:
            self._bars[k] = max(rel_err(truncated_sum(factors, k), self.reference(k)) for factors in self.lapack32)
        return self._bars[k]


def truncated_sum(factors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], k: int) -> torch.Tensor:
    """Σt U_t[:, :k] diag(s_t[:k]) Vh_t[:k]."""
    return sum((u[:, :k] * s[:k]) @ vh[:k] for u, s, vh in factors)  # type: ignore[return-value]


@pytest.fixture(scope="module", params=sorted(SHAPES))
def case(request: pytest.FixtureRequest) -> Case:
    return Case(*SHAPES[request.param], seed=len(request.param))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.to(torch.float64) - want).norm() / want.norm()).item()


def projector_distance(vh: torch.Tensor, exact: torch.Tensor) -> float:
    """‖VhᵀVh − EᵀE‖_F from k × k products: ‖VhVhᵀ‖² + ‖EEᵀ‖² − 2‖VhEᵀ‖² (float64)."""
    vh, exact = vh.to(torch.float64), exact.to(torch.float64)
    square = (vh @ vh.mT).pow(2).sum() + (exact @ exact.mT).pow(2).sum() - 2 * (vh @ exact.mT).pow(2).sum()
    return square.clamp(min=0).sqrt().item()


def old_float32_gram_low_rank(a: torch.Tensor, k: int) -> torch.Tensor:
    """The float32 Gram + Rayleigh–Ritz path the default used to be (kept to show the data is hard)."""
    if a.shape[0] < a.shape[1]:
        return old_float32_gram_low_rank(a.mT, k).mT
    n = a.shape[1]
    q = k + oversampling(k)
    if q >= n:
        return low_rank(a, k, "full")
    _, vecs = torch.linalg.eigh(a.mT @ a)
    basis = vecs[:, n - q :]
    u, s, wh = torch.linalg.svd(a @ basis, full_matrices=False)
    return (u[:, :k] * s[:k]) @ (wh[:k] @ basis.mT)


def test_data_separates_float32_gram_from_lapack(case: Case) -> None:
    # the data must be able to fail the tests below: the float32 Gram route exceeds the bar somewhere
    ratios = []
    for ratio in RATIOS:
        k = case.rank(ratio)
        want = case.reference(k)
        old = rel_err(sum(old_float32_gram_low_rank(t, k) for t in case.centred), want)
        if old > FACTOR * case.bar(k):
            ratios.append(ratio)
    assert ratios, "float32 Gram path within the bar at every ratio: the data does not test the solver"


def test_low_rank_sum_is_as_exact_as_lapack_float32_at_every_ratio(case: Case) -> None:
    failures = {}
    for ratio in RATIOS:
        k = case.rank(ratio)
        want = case.reference(k)
        bar = case.bar(k)
        got = rel_err(cart_low_rank_sum(case.centred, k), want)  # Σt low_rank(τ̄t, k), default solver
        if got > FACTOR * bar:
            failures[ratio] = (got, bar)
    assert not failures, failures


def test_gram_path_is_below_lapack_float32_error_where_it_is_used(case: Case) -> None:
    used = [r for r in RATIOS if uses_gram(tuple(case.centred.shape[-2:]), case.rank(r), torch.float32)]
    assert used and max(used) >= 0.2  # the fast path is exercised up to (near) its threshold
    for ratio in used:
        k = case.rank(ratio)
        want = case.reference(k)
        got = rel_err(sum(low_rank(t, k) for t in case.centred), want)
        best = min(rel_err(truncated_sum(factors, k), want) for factors in case.lapack32)
        assert got <= best, ratio  # float64 inside: below either LAPACK float32 orientation


def test_top_svd_singular_values_and_subspaces_are_exact(case: Case) -> None:
    for ratio in RATIOS:
        k = case.rank(ratio)
        for t, tau in enumerate(case.centred):
            _, s64, vh64 = case.exact[t]
            u, s, vh = top_svd(tau, k)
            assert u.dtype == s.dtype == vh.dtype == torch.float32
            assert u.shape == (tau.shape[0], k) and vh.shape == (k, tau.shape[1])
            # singular values (Weyl: perturbation-stable) and the right singular subspace's projector;
            # bar: the worse LAPACK float32 orientation
            s_bar = proj_bar = 0.0
            for factors in case.lapack32:
                _, s32, vh32 = factors[t]
                s_bar = max(s_bar, (s32[:k].double() - s64[:k]).abs().max().item())
                proj_bar = max(proj_bar, projector_distance(vh32[:k], vh64[:k]))
            assert (s.double() - s64[:k]).abs().max().item() <= max(FACTOR * s_bar, 1e-7 * s64[0].item()), ratio
            got = projector_distance(vh, vh64[:k])
            assert got <= FACTOR * proj_bar + 1e-6, (ratio, got, proj_bar)


def test_grid_sums_share_one_factorization_and_stay_exact(case: Case) -> None:
    for ratios in (RATIOS, tuple(r for r in RATIOS if r <= GRAM_MAX_RANK_RATIO)):
        ranks = [case.rank(r) for r in ratios]
        sums = cart_low_rank_sums(case.centred, ranks)
        parts = task_low_rank_parts(case.centred, ranks)
        for k in ranks:
            want = case.reference(k)
            bar = FACTOR * case.bar(k)
            assert rel_err(sums[k], want) <= bar, (ratios[-1], k)
            assert rel_err(sum(parts[k]), want) <= bar, (ratios[-1], k)


def test_float32_cart_with_float64_centring_is_as_exact_as_lapack_on_exact_input(case: Case) -> None:
    # CART from float32 fine-tunes against the float64 pipeline (float64 centring, LAPACK float64): the
    # float32 result may not add more than the solver's own round-off (a float32 θ_avg here: 1.5–13×)
    tuned = list(case.thetas)
    average, centred = centred_task_vectors(tuned)
    wide = case.thetas.to(torch.float64)
    assert torch.equal(average, wide.mean(dim=0).to(torch.float32))
    assert torch.equal(centred, case.centred)  # one rounding of the float64 difference
    for ratio in (0.05, 0.12, 0.32, 0.75):
        k = case.rank(ratio)
        want = case.reference(k)
        got = rel_err(cart_low_rank_sum(centred, k), want)
        assert got <= FACTOR * case.bar(k), ratio


def test_float64_centring_keeps_float64_results_bit_identical() -> None:
    g = torch.Generator().manual_seed(5)
    tuned = [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    average, centred = centred_task_vectors(tuned)
    old_average = (tuned[0] + tuned[1] + tuned[2]) / 3
    assert torch.equal(average, old_average)
    assert torch.equal(centred, torch.stack(tuned) - old_average)


@pytest.mark.parametrize("ratio", [0.05, 0.32, 0.75])
def test_float64_inputs_use_lapack_bit_for_bit(ratio: float) -> None:
    a = zoo_like_task_vector(384, 200, torch.Generator().manual_seed(1))
    k = max(1, int(ratio * 200))
    for got, want in zip(top_svd(a, k, "gram"), top_svd(a, k, "full"), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_kernels_keep_every_input_dtype(dtype: torch.dtype) -> None:
    a64 = zoo_like_task_vector(96, 64, torch.Generator().manual_seed(2), rms=1.0)
    a = a64.to(dtype)
    exact = a.to(torch.float64)  # the rounded input, factorized exactly
    tol = 4 * torch.finfo(dtype).eps
    for k in (3, 40):
        for solver in ("gram", "full"):
            got = low_rank(a, k, solver)
            assert got.dtype == dtype
            assert rel_err(got, low_rank(exact, k, "full")) <= tol + 1e-5, (dtype, k, solver)
    u, s, vh = svd(a)
    assert u.dtype == s.dtype == vh.dtype == dtype
    assert rel_err((u.double() * s.double()) @ vh.double(), exact) <= tol + 1e-6
    assert polar(a).dtype == dtype
    w, v = eigh(a.mT @ a)
    assert w.dtype == v.dtype == dtype
