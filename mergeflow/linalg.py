"""Singular-value kernels shared by the low-rank merge methods. Pure functions over tensors.

``top_svd(A, k)`` returns the leading ``k`` singular triplets ``(U_k, s_k, Vh_k)`` of a matrix.
Two solvers give the same triplets to float round-off:

- ``full``: ``torch.linalg.svd`` of ``A`` (LAPACK gesdd) in ``A``'s dtype, then truncation.
- ``gram`` (default): eigendecomposition of the short-side Gram matrix ``G = AᵀA`` (or ``AAᵀ``), whose
  top ``q = k + p`` eigenvectors ``Q`` span a subspace containing the top-``k`` right singular vectors;
  a Rayleigh–Ritz step then takes the SVD of the thin ``B = A·Q`` (m × q) and rotates back:
  ``A ≈ U_B · diag(s_B) · (Q·W_B)ᵀ``. The whole path runs in float64 (``G`` of a float32 ``A`` is then
  exact to float64 round-off; squaring the condition number costs ε64·κ², far below ε32·κ) and the
  triplets are rounded back to ``A``'s dtype. On the text zoo's centred task vectors its error on
  Σt SVD_k(τ̄t) is 0.04–0.36× LAPACK float32's at every rank ratio 0.01–0.75, where the former float32
  Gram path had 1.1–7× (35× on single matrices at ratio 0.32; benchmarks/bench_svd_accuracy.py).
  It is taken only where it is faster than LAPACK float32, ``k ≤ GRAM_MAX_RANK_RATIO · min(m, n)``
  with ``q < min(m, n)``, and only for inputs narrower than float64: a float64 ``G`` has no wider dtype
  to be formed in, so float64 inputs always go to LAPACK, exact in their own precision.

Every factorization goes through ``svd`` / ``eigh`` here, which never let a LAPACK convergence failure
end a merge: on ``torch.linalg.LinAlgError`` or non-finite output they retry in float64, then with
the QR-iteration drivers (cuSOLVER gesvd on CUDA; SciPy's gesvd / syev on the CPU), log a warning on
logger ``mergeflow.linalg`` naming what failed and what succeeded, and raise ``NumericalError`` (one
line) only when every solver failed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from mergeflow.errors import NumericalError

logger = logging.getLogger(__name__)

SVD_SOLVERS = ("gram", "full")

# Largest k / min(m, n) for which the float64 Gram path is used. Both sides of the threshold are exact
# (float64 Gram path: the final rounding only; LAPACK float32: its own round-off), so the value is set
# by speed, measured with 2 threads on a Xeon for float32 384×384, 1536×384, 768×768 and 3072×768
# matrices (benchmarks/bench_svd_accuracy.py --timing): up to k/min = 0.25 the Gram path takes 0.44–0.93×
# the time of LAPACK float32, at 0.32 0.81–1.14× (a tie, which its 8× smaller error breaks: the papers'
# 20-task CART setting is 0.32), from 0.4 on 0.94–2.4×.
GRAM_MAX_RANK_RATIO = 0.33

Factors = tuple[torch.Tensor, ...]


def oversampling(k: int) -> int:
    """Extra Gram eigenvectors kept beyond ``k``: ``p = max(16, ⌊k/4⌋)``.

    A safeguard for spectra with a near-degenerate cut at ``k``: the Rayleigh–Ritz step resolves the
    top ``k`` triplets from the ``q = k + p`` dimensional subspace, so a tiny gap σ_k − σ_{k+1} inside it
    costs no accuracy; the extra columns cost little (one m × q product and a thin m × q SVD).
    """
    return max(16, k // 4)


def _solve_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype LAPACK works in for an input of ``dtype``: float64 stays, anything narrower uses float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _robust(op: str, a: torch.Tensor, attempts: list[tuple[str, Callable[[torch.Tensor], Factors]]]) -> Factors:
    """Run ``attempts`` in order until one returns finite factors; cast them to ``a``'s dtype.

    A failure is ``torch.linalg.LinAlgError`` / ``numpy.linalg.LinAlgError`` (LAPACK did not converge)
    or non-finite output. A later success is logged as a warning; if every attempt fails, the
    ``NumericalError`` lists each failure on one line.
    """
    what = f"{op} of a {'×'.join(map(str, a.shape))} {str(a.dtype).removeprefix('torch.')} matrix"
    if not bool(torch.isfinite(a).all()):
        raise NumericalError(f"{what}: the input has non-finite values")
    failures: list[str] = []
    for name, solve in attempts:
        try:
            factors = solve(a)
        except (torch.linalg.LinAlgError, np.linalg.LinAlgError) as exc:
            failures.append(f"{name} failed ({_first_line(exc)})")
            continue
        if not all(bool(torch.isfinite(f).all()) for f in factors):
            failures.append(f"{name} gave non-finite values")
            continue
        if failures:
            logger.warning("%s: %s; %s succeeded", what, "; ".join(failures), name)
        return tuple(f.to(a.dtype) for f in factors)
    raise NumericalError(f"{what} failed with every solver tried: {'; '.join(failures)}")


def _torch_svd(dtype: torch.dtype, driver: str | None = None) -> Callable[[torch.Tensor], Factors]:
    def solve(a: torch.Tensor) -> Factors:
        if driver is None:
            return tuple(torch.linalg.svd(a.to(dtype), full_matrices=False))
        return tuple(torch.linalg.svd(a.to(dtype), full_matrices=False, driver=driver))

    return solve


def _scipy_svd(a: torch.Tensor) -> Factors:
    """Thin SVD by LAPACK dgesvd (QR iteration: slower than divide and conquer, converges where it does not)."""
    import scipy.linalg

    host = a.detach().to("cpu", torch.float64).numpy()
    u, s, vh = scipy.linalg.svd(host, full_matrices=False, lapack_driver="gesvd", check_finite=False)
    return tuple(torch.from_numpy(x).to(a.device) for x in (u, s, vh))


def svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``a = U diag(s) Vh`` (s descending) that survives LAPACK convergence failures.

    Tries ``torch.linalg.svd`` in ``a``'s dtype, then in float64, then cuSOLVER gesvd (CUDA), then SciPy
    gesvd; see ``_robust``. The factors come back in ``a``'s dtype.
    """
    work = _solve_dtype(a.dtype)
    attempts = [(f"torch.linalg.svd ({str(work).removeprefix('torch.')})", _torch_svd(work))]
    if work != torch.float64:
        attempts.append(("torch.linalg.svd (float64)", _torch_svd(torch.float64)))
    if a.device.type == "cuda":
        attempts.append(("torch.linalg.svd (float64, gesvd)", _torch_svd(torch.float64, "gesvd")))
    attempts.append(("scipy.linalg.svd (float64, gesvd)", _scipy_svd))
    u, s, vh = _robust("SVD", a, attempts)
    return u, s, vh


def _torch_eigh(dtype: torch.dtype) -> Callable[[torch.Tensor], Factors]:
    def solve(a: torch.Tensor) -> Factors:
        return tuple(torch.linalg.eigh(a.to(dtype)))

    return solve


def _scipy_eigh(a: torch.Tensor) -> Factors:
    """Symmetric eigendecomposition by LAPACK dsyev (implicit QL/QR iteration)."""
    import scipy.linalg

    host = a.detach().to("cpu", torch.float64).numpy()
    w, v = scipy.linalg.eigh(host, driver="ev", check_finite=False)
    return torch.from_numpy(w).to(a.device), torch.from_numpy(v).to(a.device)


def eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition ``a = V diag(w) Vᵀ`` of a symmetric matrix (w ascending), robust like ``svd``.

    Tries ``torch.linalg.eigh`` in ``a``'s dtype, then in float64, then SciPy syev; see ``_robust``.
    """
    work = _solve_dtype(a.dtype)
    attempts = [(f"torch.linalg.eigh ({str(work).removeprefix('torch.')})", _torch_eigh(work))]
    if work != torch.float64:
        attempts.append(("torch.linalg.eigh (float64)", _torch_eigh(torch.float64)))
    attempts.append(("scipy.linalg.eigh (float64, syev)", _scipy_eigh))
    w, v = _robust("eigendecomposition", a, attempts)
    return w, v


def uses_gram(shape: tuple[int, int], k: int, dtype: torch.dtype, solver: str = "gram") -> bool:
    """Whether ``top_svd`` takes the Gram path: solver ``gram``, an input narrower than float64,
    ``k ≤ GRAM_MAX_RANK_RATIO · min(m, n)`` and ``k + p < min(m, n)``."""
    short = min(shape)
    return (
        solver == "gram"
        and dtype != torch.float64
        and 0 < k <= GRAM_MAX_RANK_RATIO * short
        and k + oversampling(k) < short
    )


def _top_svd_gram(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k triplets of a tall ``a`` (m ≥ n, k + p < n) by float64 Gram eigenvectors + Rayleigh–Ritz.

    G = AᵀA (float64), Q = its top q = k + p eigenvectors, B = A·Q = U_B diag(s_B) W_Bᵀ;
    then U_k = U_B[:, :k], s_k = s_B[:k], Vh_k = W_Bᵀ[:k] · Qᵀ.
    """
    n = a.shape[1]
    q = k + oversampling(k)
    a64 = a.to(torch.float64)
    _, vecs = eigh(a64.mT @ a64)
    basis = vecs[:, n - q :]  # eigenvalues ascend: the last q columns span the top subspace
    u_b, s_b, wh = svd(a64 @ basis)
    vh = wh[:k] @ basis.mT
    return u_b[:, :k].to(a.dtype), s_b[:k].to(a.dtype), vh.to(a.dtype)


def top_svd(a: torch.Tensor, k: int, solver: str = "gram") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading ``k`` singular triplets of a 2-D ``a``: ``a ≈ U_k diag(s_k) Vh_k`` (k clipped to min(m, n)).

    ``solver="gram"`` picks the float64 Gram path where ``uses_gram`` says so and LAPACK elsewhere;
    ``"full"`` is always LAPACK. Both are exact to the round-off of ``a``'s dtype.
    """
    if a.ndim != 2:
        raise ValueError(f"top_svd needs a matrix, got shape {tuple(a.shape)}")
    if solver not in SVD_SOLVERS:
        raise ValueError(f"unknown SVD solver {solver!r}; known: {SVD_SOLVERS}")
    m, n = a.shape
    k = max(0, min(k, m, n))
    if m < n:  # work on the tall transpose: A = (Aᵀ)ᵀ = (U' S Vh')ᵀ = Vh'ᵀ S U'ᵀ
        u, s, vh = top_svd(a.mT, k, solver)
        return vh.mT, s, u.mT
    if uses_gram((m, n), k, a.dtype, solver):
        try:
            return _top_svd_gram(a, k)
        except NumericalError as exc:  # every eigh/SVD solver failed on G or B: one more path remains
            logger.warning("Gram path of top_svd failed (%s); using the full SVD", exc)
    u, s, vh = svd(a)
    return u[:, :k], s[:k], vh[:k]


def low_rank(a: torch.Tensor, k: int, solver: str = "gram") -> torch.Tensor:
    """``SVD_k(a) = U_k diag(s_k) Vh_k``, the best rank-``k`` approximation of ``a``.

    Zero for k = 0, ``a`` itself at full rank.
    """
    if k <= 0:
        return torch.zeros_like(a)
    if k >= min(a.shape):
        return a.clone()
    u, s, vh = top_svd(a, k, solver)
    return (u * s) @ vh


def polar(a: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor ``U Vh`` of ``a = U diag(s) Vh`` (the Procrustes-nearest orthogonal matrix)."""
    u, _, vh = svd(a)
    return u @ vh


def rank_from_ratio(ratio: float, shape: tuple[int, ...]) -> int:
    """CART's rank rule: ``k = max(1, floor(ratio · min(m, n)))``; ratio 0 keeps nothing."""
    if ratio <= 0.0:
        return 0
    return max(1, int(ratio * min(shape)))
