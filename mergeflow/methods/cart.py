"""CART: centred arithmetic with rank-reduced task vectors (Choi et al., arXiv 2412.12153).

θ_CART = θ_avg + λ · Σt SVD_k(θt − θ_avg) on the selected matrices; every other tensor is θ_avg.
k = max(1, ⌊rank_ratio · min(m, n)⌋); rank_ratio 0 adds nothing. Because the centred vectors
τ̄t = θt − θ_avg sum to zero, full rank (and T = 2, where τ̄2 = −τ̄1) gives back θ_avg for any λ.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from pydantic import Field

from mergeflow.linalg import low_rank, rank_from_ratio, top_svd
from mergeflow.methods.registry import Affine, MatrixParams, Merger, StorageCost, float_bytes, register


def _wide_average(tuned: Sequence[torch.Tensor]) -> torch.Tensor:
    """θ_avg = (1/T) Σt θt accumulated in float64, one task at a time (as ``weight_average`` for float64)."""
    total = tuned[0].to(torch.float64, copy=True)
    for tensor in tuned[1:]:
        total += tensor
    return total / len(tuned)


def centred_average(tuned: Sequence[torch.Tensor]) -> torch.Tensor:
    """θ_avg = (1/T) Σt θt, computed in float64 and rounded once to the inputs' dtype."""
    return _wide_average(tuned).to(tuned[0].dtype)


def centred_task_vectors(tuned: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ_avg, stacked τ̄t = θt − θ_avg); the τ̄t sum to zero over t.

    Both are computed in float64 and rounded once to the inputs' dtype: τ̄t is a small difference of
    large weights, and a float32 θ_avg would carry an error ≈ ε·|θ| that is ≈ ε·|θ|/|τ̄t| relative to
    τ̄t (|θ|/|τ̄t| ≈ 200 on the text zoo, where float32 centring gives Σt SVD_k(τ̄t) relative errors of
    3.6e-6–1.5e-3 over rank ratios 0.01–0.99: 7–70× those of float64 centring, up to 13× LAPACK
    float32's own; benchmarks/bench_svd_accuracy.py). Costs ≈ 4% of the SVDs. Float64 inputs: unchanged.
    """
    dtype = tuned[0].dtype
    average = _wide_average(tuned)
    centred = torch.stack([(t.to(torch.float64) - average).to(dtype) for t in tuned])
    return average.to(dtype), centred


def cart_low_rank_sum(centred: torch.Tensor, k: int, solver: str = "gram") -> torch.Tensor:
    """Σt SVD_k(τ̄t) for stacked centred matrices (T × m × n)."""
    total = torch.zeros_like(centred[0])
    for tau in centred:
        total += low_rank(tau, k, solver)
    return total


def cart_low_rank_sums(centred: torch.Tensor, ranks: Sequence[int], solver: str = "gram") -> dict[int, torch.Tensor]:
    """Σt SVD_k(τ̄t) for several k from one factorization per task.

    Each task's top-k_max triplets are computed once; sums for increasing k are built
    incrementally, so R ranks cost one SVD pass plus one rank-k_max reconstruction per task.
    """
    wanted = sorted(set(ranks))
    full = min(centred.shape[-2:])
    out: dict[int, torch.Tensor] = {}
    partial = [k for k in wanted if 0 < k < full]
    for k in wanted:
        if k <= 0:
            out[k] = torch.zeros_like(centred[0])
        elif k >= full:
            out[k] = centred.sum(dim=0)
    if partial:
        k_max = partial[-1]
        factors = [top_svd(tau, k_max, solver) for tau in centred]
        running = torch.zeros_like(centred[0])
        previous = 0
        for k in partial:
            for u, s, vh in factors:
                running += (u[:, previous:k] * s[previous:k]) @ vh[previous:k]
            out[k] = running.clone()
            previous = k
    return out


class CartParams(MatrixParams):
    scaling: float = Field(2.0, description="λ in θ_avg + λ·Σt SVD_k(τ̄t)")
    rank_ratio: float = Field(0.12, ge=0.0, le=1.0, description="k = max(1, ⌊rank_ratio·min(m, n)⌋); 0 adds nothing")
    selector_name: Literal["attn_mlp", "all_2d"] = Field(
        "attn_mlp", alias="selector", description="named rule choosing the matrices to factorize"
    )


@register("cart", CartParams, "θ_avg + scaling·Σt SVD_k(θt − θ_avg) on selected matrices, θ_avg elsewhere")
class Cart(Merger):
    params: CartParams

    def affine(self, key: str, base: torch.Tensor, tuned: list[torch.Tensor]) -> Affine:
        """A = θ_avg; D = Σt SVD_k(τ̄t) on selected matrices, none elsewhere."""
        if key not in self.selected:
            return centred_average(tuned), None
        average, centred = centred_task_vectors(tuned)
        k = rank_from_ratio(self.params.rank_ratio, tuple(base.shape))
        return average, cart_low_rank_sum(centred, k, self.params.svd_solver)

    def affine_grid(
        self, key: str, base: torch.Tensor, tuned: list[torch.Tensor], grid: Sequence[Merger]
    ) -> Iterator[Affine | list[Affine]]:
        """(A, D) of every rank of a sweep from one factorization per task."""
        shared = _shared_grid(self, key, base, tuned, grid)
        if shared is None:
            return super().affine_grid(key, base, tuned, grid)
        average, centred, ranks, solver = shared
        sums = cart_low_rank_sums(centred, ranks, solver)
        return ((average, sums[k]) for k in ranks)


def _shared_grid(
    merger: Merger, key: str, base: torch.Tensor, tuned: list[torch.Tensor], grid: Sequence[Merger]
) -> tuple[torch.Tensor, torch.Tensor, list[int], str] | None:
    """(θ_avg, τ̄, ranks, solver) when every grid point is the same CART variant on the same
    selection and solver (factorizations can be shared), else None."""
    solvers = {getattr(m.params, "svd_solver", None) for m in grid}
    if (
        key not in merger.selected
        or len(solvers) != 1
        or any(type(m) is not type(merger) or m.selected != merger.selected for m in grid)
    ):
        return None
    average, centred = centred_task_vectors(tuned)
    points = [m.params for m in grid if isinstance(m.params, CartParams)]
    ranks = [rank_from_ratio(p.rank_ratio, tuple(base.shape)) for p in points]
    return average, centred, ranks, str(solvers.pop())


@register("cart_indexing", CartParams, "one model per task: θ_avg + scaling·SVD_k(θt − θ_avg)")
class CartIndexing(Merger):
    params: CartParams
    per_task_outputs = True

    def affine(self, key: str, base: torch.Tensor, tuned: list[torch.Tensor]) -> list[Affine]:
        """Per task t: A = θ_avg; D = SVD_k(τ̄t) on selected matrices, none elsewhere."""
        if key not in self.selected:
            average = centred_average(tuned)
            return [(average, None)] * len(tuned)
        average, centred = centred_task_vectors(tuned)
        k = rank_from_ratio(self.params.rank_ratio, tuple(base.shape))
        return [(average, low_rank(tau, k, self.params.svd_solver)) for tau in centred]

    def affine_grid(
        self, key: str, base: torch.Tensor, tuned: list[torch.Tensor], grid: Sequence[Merger]
    ) -> Iterator[Affine | list[Affine]]:
        """Per-task (A, D) of every rank of a sweep from one truncated SVD per task at the largest rank."""
        shared = _shared_grid(self, key, base, tuned, grid)
        if shared is None:
            return super().affine_grid(key, base, tuned, grid)
        average, centred, ranks, solver = shared
        parts = task_low_rank_parts(centred, ranks, solver)
        return ([(average, part) for part in parts[k]] for k in ranks)

    def storage_cost(self) -> StorageCost:
        """θ_avg once (a whole model), and per task k·(m + n + 1) values per selected matrix."""
        per_task = 0
        for key in self.selected:
            meta = self.ctx.layout[key]
            m, n = meta.shape
            k = min(rank_from_ratio(self.params.rank_ratio, (m, n)), min(m, n))
            per_task += min(k * (m + n + 1), m * n) * meta.dtype.itemsize  # triplets, or the matrix if smaller
        return StorageCost(shared=float_bytes(self.ctx.layout), per_task=per_task)


def task_low_rank_parts(
    centred: torch.Tensor, ranks: Sequence[int], solver: str = "gram"
) -> dict[int, list[torch.Tensor]]:
    """[SVD_k(τ̄t) for each t] for several k, from one top-k_max factorization per task."""
    full = min(centred.shape[-2:])
    partial = sorted({k for k in ranks if 0 < k < full})
    factors = [top_svd(tau, partial[-1], solver) for tau in centred] if partial else []
    out: dict[int, list[torch.Tensor]] = {}
    for k in set(ranks):
        if k <= 0:
            out[k] = [torch.zeros_like(tau) for tau in centred]
        elif k >= full:
            out[k] = [tau.clone() for tau in centred]
        else:
            out[k] = [(u[:, :k] * s[:k]) @ vh[:k] for u, s, vh in factors]
    return out
