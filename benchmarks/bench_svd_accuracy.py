"""Accuracy (and speed) of the truncated-SVD solvers on real centred task vectors.

    python benchmarks/bench_svd_accuracy.py                       # text zoo (mergeflow zoo build first)
    python benchmarks/bench_svd_accuracy.py --synthetic           # no zoo: decaying spectra shaped like it
    python benchmarks/bench_svd_accuracy.py --timing              # speed of each solver by rank ratio

Accuracy: for every CART-selected matrix of the zoo, τ̄t = θt − θ_avg is centred in float64 and rounded
to float32, which isolates the solver. For each rank ratio, k = max(1, ⌊ratio·min(m, n)⌋) and

    error(solver) = ‖Σt SVD_k(τ̄t)[solver, float32] − Σt SVD_k(τ̄t)[LAPACK float64]‖_F / ‖reference‖_F,

pooled over matrices (square roots of summed squares); ``worst`` is the largest per-matrix ratio to
LAPACK float32's own error. ``full32`` is LAPACK float32 as mergeflow calls it (on the tall side of the
matrix), ``full32, other side`` the same on the transpose: the spread between the two is LAPACK float32's
own round-off noise. Solvers: ``gram32`` (the float32 Gram + Rayleigh–Ritz path used before),
``gram64`` (the float64 Gram path of mergeflow.linalg, forced at every rank where q = k + p < min(m, n)),
``full32`` (LAPACK float32) and ``default`` (``top_svd(solver="gram")`` as the library runs it).

Centring: the error of Σt SVD_k(τ̄t) (default solver) when θ_avg and τ̄t are computed in float32
(``centre32``) or in float64 and rounded (``centre64``), against float64 centring + LAPACK float64.

Results are logged as Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file

from mergeflow.linalg import _top_svd_gram, low_rank, oversampling, top_svd
from mergeflow.selectors import is_attn_mlp

logger = logging.getLogger("bench_svd_accuracy")

RATIOS = (0.01, 0.02, 0.05, 0.08, 0.12, 0.16, 0.2, 0.25, 0.32, 0.4, 0.5, 0.6, 0.75, 0.9, 0.99)
LowRank = Callable[[torch.Tensor, int], torch.Tensor]


def gram32_low_rank(a: torch.Tensor, k: int) -> torch.Tensor:
    """The former float32 Gram path: eigh(AᵀA) and the Rayleigh–Ritz SVD of A·Q, all in a's dtype."""
    if a.shape[0] < a.shape[1]:
        return gram32_low_rank(a.mT, k).mT
    n = a.shape[1]
    q = k + oversampling(k)
    if q >= n:
        return low_rank(a, k, "full")
    _, vecs = torch.linalg.eigh(a.mT @ a)
    basis = vecs[:, n - q :]
    u, s, wh = torch.linalg.svd(a @ basis, full_matrices=False)
    return (u[:, :k] * s[:k]) @ (wh[:k] @ basis.mT)


def gram64_low_rank(a: torch.Tensor, k: int) -> torch.Tensor:
    """The float64 Gram path of mergeflow.linalg at any rank where it applies (LAPACK where q ≥ n)."""
    if a.shape[0] < a.shape[1]:
        return gram64_low_rank(a.mT, k).mT
    if k + oversampling(k) >= a.shape[1]:
        return low_rank(a, k, "full")
    u, s, vh = _top_svd_gram(a, k)
    return (u * s) @ vh


def default_low_rank(a: torch.Tensor, k: int) -> torch.Tensor:
    return low_rank(a, k, "gram")


def _lapack32(a: torch.Tensor, library_side: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LAPACK float32 factors of ``a`` from its tall side (as mergeflow calls it) or from the other side."""
    if (a.shape[0] >= a.shape[1]) == library_side:
        return torch.linalg.svd(a, full_matrices=False)
    u, s, vh = torch.linalg.svd(a.mT, full_matrices=False)
    return vh.mT, s, u.mT


SOLVERS: dict[str, LowRank] = {"gram32": gram32_low_rank, "gram64": gram64_low_rank, "default": default_low_rank}


def zoo_matrices(zoo: Path, stride: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, stacked float64 fine-tuned weights T × m × n) for every ``stride``-th CART-selected matrix."""
    description = json.loads((zoo / "zoo.json").read_text())
    models = [load_file(Path(task["model"])) for task in description["tasks"].values()]
    keys = [k for k, v in models[0].items() if v.ndim == 2 and v.is_floating_point() and is_attn_mlp(k)]
    for key in keys[::stride]:
        yield key, torch.stack([m[key].to(torch.float64) for m in models])


def synthetic_matrices(tasks: int = 4, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Fine-tunes θ0 + τt with τt shaped like the zoo's: power-law spectrum σ_i ∝ (1+i)^-0.7 plus noise."""
    g = torch.Generator().manual_seed(seed)
    for name, (m, n) in {"square": (384, 384), "wide": (384, 1536), "tall": (1536, 384)}.items():
        theta0 = 0.05 * torch.randn(m, n, generator=g, dtype=torch.float64)
        taus = [decaying_task_vector(m, n, g) for _ in range(tasks)]
        yield name, torch.stack([theta0 + tau for tau in taus])


def decaying_task_vector(m: int, n: int, g: torch.Generator, scale: float = 2.5e-4) -> torch.Tensor:
    """U diag(σ) Vᵀ + noise with σ_i = (1 + i)^-0.7, random orthonormal U, V; RMS entry ≈ ``scale``."""
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    s = (1.0 + torch.arange(r, dtype=torch.float64)) ** -0.7
    a = (u * s) @ v.T + 0.02 * torch.randn(m, n, generator=g, dtype=torch.float64) / max(m, n) ** 0.5
    return a * (scale / a.pow(2).mean().sqrt())


def _truncate(factors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], k: int) -> torch.Tensor:
    """Σt U_t[:, :k] diag(s_t[:k]) Vh_t[:k] in the factors' dtype."""
    total = torch.zeros_like(factors[0][0][:, :1] @ factors[0][2][:1])
    for u, s, vh in factors:
        total += (u[:, :k] * s[:k]) @ vh[:k]
    return total


def accuracy(matrices: Iterator[tuple[str, torch.Tensor]], ratios: tuple[float, ...]) -> dict[float, dict]:
    """Pooled relative errors per ratio for every solver, LAPACK float32 and both centrings."""
    names = ["full32", "full32_other", *SOLVERS, "centre32", "centre64"]
    sq_err = {r: dict.fromkeys(names, 0.0) for r in ratios}
    sq_ref = dict.fromkeys(ratios, 0.0)
    worst = {r: dict.fromkeys(names, 0.0) for r in ratios}
    for key, thetas in matrices:
        start = time.perf_counter()
        centred64 = thetas - thetas.mean(dim=0)
        centred = centred64.to(torch.float32)  # isolates the solver: its input is exact in float32
        thetas32 = thetas.to(torch.float32)
        avg32 = thetas32.sum(dim=0) / len(thetas32)
        centred_f32 = thetas32 - avg32  # centring in float32, as CART did before
        exact_in = centred.to(torch.float64)
        ref_factors = [torch.linalg.svd(t, full_matrices=False) for t in exact_in]
        ref_centring = [torch.linalg.svd(t, full_matrices=False) for t in centred64]
        full32 = [_lapack32(t, library_side=True) for t in centred]
        full32_other = [_lapack32(t, library_side=False) for t in centred]
        for ratio in ratios:
            k = max(1, int(ratio * min(centred.shape[-2:])))
            ref = _truncate(ref_factors, k)
            ref_c = _truncate(ref_centring, k)
            got = {"full32": (_truncate(full32, k), ref), "full32_other": (_truncate(full32_other, k), ref)}
            for name, solve in SOLVERS.items():
                got[name] = (sum(solve(t, k) for t in centred), ref)
            got["centre32"] = (sum(low_rank(t, k, "gram") for t in centred_f32), ref_c)
            got["centre64"] = (sum(low_rank(t, k, "gram") for t in centred), ref_c)
            sq_ref[ratio] += ref.pow(2).sum().item()
            errs = {name: (value.to(torch.float64) - want).pow(2).sum().item() for name, (value, want) in got.items()}
            for name, err in errs.items():
                sq_err[ratio][name] += err
                worst[ratio][name] = max(worst[ratio][name], (err / max(errs["full32"], 1e-300)) ** 0.5)
        logger.info("%s %s: %.1f s", key, tuple(thetas.shape[1:]), time.perf_counter() - start)
    return {
        r: {
            "error": {n: (sq_err[r][n] / sq_ref[r]) ** 0.5 for n in names},
            "worst": worst[r],
        }
        for r in ratios
    }


def accuracy_table(results: dict[float, dict]) -> str:
    """Markdown: pooled error per solver (× LAPACK float32's), worst per-matrix ratio, both centrings."""
    head = "| rank ratio | full32 | full32, other side | gram32 (old) | gram64 | default "
    head += "| worst other side / gram32 / gram64 / default | centre32 | centre64 |"
    lines = [head, "|" + "---|" * 9]
    for ratio, row in results.items():
        e, w = row["error"], row["worst"]
        rel = {n: e[n] / e["full32"] for n in e}
        lines.append(
            f"| {ratio:.2f} | {e['full32']:.2e} | {e['full32_other']:.2e} ({rel['full32_other']:.2f}×) "
            f"| {e['gram32']:.2e} ({rel['gram32']:.1f}×) | {e['gram64']:.2e} ({rel['gram64']:.2f}×) "
            f"| {e['default']:.2e} ({rel['default']:.2f}×) "
            f"| {w['full32_other']:.2f}× / {w['gram32']:.1f}× / {w['gram64']:.2f}× / {w['default']:.2f}× "
            f"| {e['centre32']:.2e} | {e['centre64']:.2e} |"
        )
    return "\n".join(lines)


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def timing(shapes: list[tuple[int, int]], ratios: tuple[float, ...], repeats: int) -> str:
    """Median milliseconds of one top-k factorization per solver (float32 input)."""
    g = torch.Generator().manual_seed(0)
    lines = ["| shape | rank ratio | gram32 (old) ms | gram64 ms | full32 ms | gram64 / full32 |", "|" + "---|" * 6]
    for m, n in shapes:
        a = decaying_task_vector(m, n, g).to(torch.float32)
        tall = a if m >= n else a.mT
        full = _median_ms(lambda a=a: top_svd(a, 1, "full"), repeats)
        for ratio in ratios:
            k = max(1, int(ratio * min(m, n)))
            if k + oversampling(k) >= min(m, n):
                continue
            old = _median_ms(lambda a=a, k=k: gram32_low_rank(a, k), repeats)
            new = _median_ms(lambda tall=tall, k=k: _top_svd_gram(tall, k), repeats)
            lines.append(f"| {m}×{n} | {ratio:.2f} | {old:.1f} | {new:.1f} | {full:.1f} | {new / full:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path("out/zoo/text-minilm"))
    parser.add_argument("--stride", type=int, default=1, help="use every n-th selected matrix of the zoo")
    parser.add_argument("--synthetic", action="store_true", help="zoo-shaped random matrices instead of the zoo")
    parser.add_argument("--timing", action="store_true", help="time the solvers instead")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    logger.info(
        "%s, %s, torch %s, %d threads",
        platform.processor() or platform.machine(),
        platform.platform(),
        torch.__version__,
        torch.get_num_threads(),
    )
    if args.timing:
        shapes = [(384, 384), (1536, 384), (768, 768), (3072, 768)]
        logger.info("%s", timing(shapes, RATIOS, args.repeats))
        return
    matrices = synthetic_matrices() if args.synthetic else zoo_matrices(args.zoo, args.stride)
    logger.info("%s", accuracy_table(accuracy(matrices, RATIOS)))


if __name__ == "__main__":
    main()
