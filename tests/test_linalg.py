"""Singular-value kernels: the Gram/Rayleigh-Ritz solver against LAPACK, rank rule, polar factor, and the
fallbacks that keep a LAPACK convergence failure from ending a merge."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from mergeflow.errors import MergeflowError, NumericalError
from mergeflow.linalg import eigh, low_rank, polar, rank_from_ratio, svd, top_svd
from mergeflow.methods.singular import iso_c_merge, iso_cts_merge, tsv_merge


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


# --- an SVD never crashes a merge: fallbacks on LAPACK failure (mergeflow.linalg.svd / eigh) ---------

CONVERGENCE = "linalg.svd: The algorithm failed to converge because the input matrix is ill-conditioned"


def fail_calls(
    monkeypatch: pytest.MonkeyPatch, owner: object, name: str, times: int = 1, nan: bool = False
) -> list[object]:
    """Make ``owner.name`` fail on its first ``times`` calls: raise LinAlgError, or return NaNs (``nan``)."""
    original = getattr(owner, name)
    calls: list[object] = []

    def patched(*args: object, **kwargs: object) -> object:
        calls.append(args)
        if len(calls) > times:
            return original(*args, **kwargs)
        if nan:
            return type(out := original(*args, **kwargs))(torch.full_like(t, float("nan")) for t in out)
        if owner is torch.linalg:
            raise torch.linalg.LinAlgError(CONVERGENCE)
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(owner, name, patched)
    return calls


def stacked_bases(m: int = 48, blocks: int = 3, width: int = 8, seed: int = 0) -> torch.Tensor:
    """[Q1 | Q2 | Q3]: orthonormal blocks side by side (singular values cluster; Iso-CTS / TSV polar input)."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat(
        [torch.linalg.qr(torch.randn(m, width, generator=g, dtype=torch.float64))[0] for _ in range(blocks)], 1
    )


def task_stack(seed: int = 0) -> torch.Tensor:
    return torch.stack([decaying(40, 30, seed=seed + t, scale=8.0) for t in range(3)])


OPERATIONS = {
    "polar": lambda a: polar(stacked_bases().to(a.dtype)),
    "iso_c": lambda a: iso_c_merge(a),
    "top_svd_full": lambda a: low_rank(a, 5, "full"),
    "top_svd_gram": lambda a: low_rank(a, 5, "gram"),
    "tsv": lambda a: tsv_merge(task_stack().to(a.dtype)),
    "iso_cts": lambda a: iso_cts_merge(task_stack().to(a.dtype), 0.8),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("operation", sorted(OPERATIONS))
@pytest.mark.parametrize("failure", ["raises", "nan", "torch_always"])
def test_svd_failure_falls_back_to_the_same_result(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, operation: str, dtype: torch.dtype, failure: str
) -> None:
    a = decaying(40, 30, seed=1, scale=8.0).to(dtype)
    run = OPERATIONS[operation]
    normal = run(a)
    times = 100 if failure == "torch_always" else 1  # torch_always: only SciPy's gesvd is left
    calls = fail_calls(monkeypatch, torch.linalg, "svd", times=times, nan=failure == "nan")
    with caplog.at_level(logging.WARNING, logger="mergeflow.linalg"):
        fallback = run(a)
    assert calls, "the operation did not go through torch.linalg.svd"
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(fallback, normal, rtol=tol, atol=tol * normal.abs().max().item())
    warnings = [r for r in caplog.records if r.name == "mergeflow.linalg" and r.levelno == logging.WARNING]
    assert warnings and "succeeded" in warnings[0].getMessage()
    assert ("non-finite" if failure == "nan" else "LinAlgError") in warnings[0].getMessage()
    if failure == "torch_always":
        assert "scipy.linalg.svd (float64, gesvd) succeeded" in warnings[0].getMessage()


@pytest.mark.parametrize("failure", ["raises", "nan"])
def test_gram_path_eigh_failure_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    a = decaying(200, 120, seed=2).float()
    normal = low_rank(a, 10, "gram")
    calls = fail_calls(monkeypatch, torch.linalg, "eigh", nan=failure == "nan")
    with caplog.at_level(logging.WARNING, logger="mergeflow.linalg"):
        fallback = low_rank(a, 10, "gram")
    assert calls
    torch.testing.assert_close(fallback, normal, rtol=1e-5, atol=1e-6 * normal.abs().max().item())
    assert "scipy.linalg.eigh (float64, syev) succeeded" in caplog.text


def test_gram_path_uses_the_full_svd_when_every_eigh_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import scipy.linalg

    a = decaying(200, 120, seed=2).float()
    normal = low_rank(a, 10, "gram")
    fail_calls(monkeypatch, torch.linalg, "eigh", times=100)
    fail_calls(monkeypatch, scipy.linalg, "eigh", times=100)
    with caplog.at_level(logging.WARNING, logger="mergeflow.linalg"):
        fallback = low_rank(a, 10, "gram")
    torch.testing.assert_close(fallback, normal, rtol=1e-4, atol=1e-5 * normal.abs().max().item())
    assert "Gram path of top_svd failed" in caplog.text and "using the full SVD" in caplog.text


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_every_solver_failing_is_one_numerical_error(monkeypatch: pytest.MonkeyPatch, operation: str) -> None:
    import scipy.linalg

    fail_calls(monkeypatch, torch.linalg, "svd", times=100)
    fail_calls(monkeypatch, torch.linalg, "eigh", times=100)
    fail_calls(monkeypatch, scipy.linalg, "svd", times=100)
    fail_calls(monkeypatch, scipy.linalg, "eigh", times=100)
    with pytest.raises(NumericalError) as info:
        OPERATIONS[operation](decaying(40, 30, seed=1, scale=8.0).float())
    assert isinstance(info.value, MergeflowError)
    message = str(info.value)
    assert "\n" not in message and "failed with every solver tried" in message
    assert "torch.linalg.svd (float32) failed" in message and "scipy.linalg.svd (float64, gesvd) failed" in message


def test_non_finite_input_is_a_numerical_error() -> None:
    a = torch.ones(6, 4)
    a[2, 1] = float("nan")
    with pytest.raises(NumericalError, match="non-finite"):
        polar(a)
    with pytest.raises(NumericalError, match="non-finite"):
        top_svd(a, 2, "full")


def test_svd_and_eigh_wrappers_match_torch() -> None:
    a = decaying(30, 20, seed=4, scale=5.0)
    u, s, vh = svd(a)
    torch.testing.assert_close((u * s) @ vh, a)
    torch.testing.assert_close(s, torch.linalg.svdvals(a))
    g = a.T @ a
    w, v = eigh(g)
    torch.testing.assert_close(w, torch.linalg.eigvalsh(g))
    torch.testing.assert_close((v * w) @ v.T, g)


def test_a_merge_survives_a_failing_first_solver_and_reports_total_failure_in_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Iso-CTS through the engine: one LAPACK failure changes nothing; every solver failing is one line
    naming the method and the key, and no output is left behind."""
    import scipy.linalg
    from helpers import LAYOUTS, load, random_state_dicts, write_set

    from mergeflow.engine import merge_checkpoints

    base, tuned = random_state_dicts(LAYOUTS["open_clip"](), tasks=3, seed=5, dtype=torch.float32)
    theta0, models = write_set(tmp_path / "in", base, tuned)
    clean = load(merge_checkpoints("iso_cts", theta0, models, tmp_path / "clean.safetensors", device="cpu").outputs[0])
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="mergeflow.linalg"):
        fail_calls(patch, torch.linalg, "svd", times=1)
        fallback = merge_checkpoints("iso_cts", theta0, models, tmp_path / "fallback.safetensors", device="cpu")
    assert [r.getMessage() for r in caplog.records if "succeeded" in r.getMessage()], "the fallback was not taken"
    got = load(fallback.outputs[0])
    assert got.keys() == clean.keys()
    for key, tensor in clean.items():
        torch.testing.assert_close(got[key], tensor, rtol=1e-5, atol=1e-6)
    for owner, name in ((torch.linalg, "svd"), (torch.linalg, "eigh"), (scipy.linalg, "svd"), (scipy.linalg, "eigh")):
        fail_calls(monkeypatch, owner, name, times=10_000)
    out = tmp_path / "failed.safetensors"
    with pytest.raises(NumericalError) as info:
        merge_checkpoints("iso_cts", theta0, models, out, device="cpu")
    message = str(info.value)
    assert message.startswith("iso_cts: key '") and "\n" not in message
    assert "failed with every solver tried" in message
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))
