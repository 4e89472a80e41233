"""Merges that rebuild each matrix from singular vectors: TSV-M, Iso-C and Iso-CTS.

Matrices are the 2-D keys picked by the selector (``all_2d`` by default, as in FusionBench); every
other float key becomes the mean task vector. The result is θ0 + scaling·merged for every key.
Every factorization (``top_svd``, ``polar``, ``svd``) is one of mergeflow.linalg's robust kernels.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergeflow.linalg import polar, svd, top_svd
from mergeflow.methods.averaging import task_vector_sum
from mergeflow.methods.registry import Affine, MatrixParams, Merger, register


def _orthogonal_rebuild(u_cat: torch.Tensor, s_cat: torch.Tensor, vh_cat: torch.Tensor) -> torch.Tensor:
    """polar(U_cat) · diag(s_cat) · polar(Vh_cat), on the columns that hold triplets."""
    return (polar(u_cat) * s_cat) @ polar(vh_cat)


def tsv_merge(taus: torch.Tensor, solver: str = "gram") -> torch.Tensor:
    """Task Singular Vectors merge of stacked task matrices (T × m × n).

    r = ⌊min(m, n)/T⌋; task i's top-r triplets fill block [i·r, (i+1)·r) of U_cat, s_cat, Vh_cat;
    merged = polar(U_cat) · diag(s_cat) · polar(Vh_cat). The polar factors are taken over the T·r
    filled columns: zero columns carry s = 0 and cannot change the product.
    """
    num_tasks = taus.shape[0]
    r = int(min(taus.shape[-2:]) / num_tasks)
    if r == 0:
        return torch.zeros_like(taus[0])
    factors = [top_svd(tau, r, solver) for tau in taus]
    u_cat = torch.cat([u for u, _, _ in factors], dim=1)
    s_cat = torch.cat([s for _, s, _ in factors])
    vh_cat = torch.cat([vh for _, _, vh in factors], dim=0)
    return _orthogonal_rebuild(u_cat, s_cat, vh_cat)


def iso_c_merge(task_sum: torch.Tensor) -> torch.Tensor:
    """Isotropic merge: Σt τt = U diag(s) Vh  ↦  mean(s) · U Vh (mean over all min(m, n) values).

    The SVD is ``mergeflow.linalg.svd``: a LAPACK convergence failure falls back to other solvers.
    """
    u, s, vh = svd(task_sum)
    return s.mean() * (u @ vh)


def iso_cts_sizes(min_dim: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common rank cs, per-task rank n_t) with T·n_t + cs = min_dim, as in the reference code.

    Where rounding up would leave a negative common rank (tiny matrices, many tasks; the reference
    code then slices with a negative index), one rank per task is dropped until cs ≥ 0.
    """
    common = int(min_dim * common_fraction)
    task_total = round((min_dim - common) / num_tasks) * num_tasks  # Python round: halves to even
    while task_total > min_dim:
        task_total -= num_tasks
    common = min_dim - task_total
    return common, int((min_dim - common) / num_tasks)


def iso_cts_merge(taus: torch.Tensor, common_fraction: float, solver: str = "gram") -> torch.Tensor:
    """Iso-CTS: a common subspace of Σt τt plus task-specific subspaces, orthogonalised, isotropic.

    U_c, s_c, Vh_c = top-cs triplets of Σt τt; for each task w = τt − U_c(U_cᵀ τt) and its top-n_t
    triplets; concatenate [tasks..., common]; merged = mean(s_all) · polar(U_all) · polar(Vh_all).
    """
    num_tasks = taus.shape[0]
    min_dim = min(taus.shape[-2:])
    common, per_task = iso_cts_sizes(min_dim, num_tasks, common_fraction)
    u_c, s_c, vh_c = top_svd(taus.sum(dim=0), common, solver)
    us, ss, vhs = [], [], []
    for tau in taus:
        residual = tau - u_c @ (u_c.mT @ tau)
        u, s, vh = top_svd(residual, per_task, solver)
        us.append(u)
        ss.append(s)
        vhs.append(vh)
    u_all = torch.cat([*us, u_c], dim=1)
    s_all = torch.cat([*ss, s_c])
    vh_all = torch.cat([*vhs, vh_c], dim=0)
    if s_all.numel() == 0:
        return torch.zeros_like(taus[0])
    return s_all.mean() * (polar(u_all) @ polar(vh_all))


class TsvParams(MatrixParams):
    scaling: float = Field(1.0, description="α in θ0 + α·merged")


class IsoCParams(MatrixParams):
    scaling: float = Field(1.5, description="α in θ0 + α·merged")


class IsoCtsParams(MatrixParams):
    scaling: float = Field(1.5, description="α in θ0 + α·merged")
    common_fraction: float = Field(0.8, ge=0.0, le=1.0, description="share of the rank given to the common subspace")


class _SingularMerger(Merger):
    """θ0 + scaling·merged, with merged from ``merge_matrix`` on selected keys and mean τ elsewhere."""

    def merge_matrix(self, taus: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def affine(self, key: str, base: torch.Tensor, tuned: list[torch.Tensor]) -> Affine:
        """A = θ0; D = merge_matrix(τ) on selected matrices, the mean τ elsewhere."""
        if key not in self.selected:
            return base, task_vector_sum(base, tuned) / len(tuned)
        return base, self.merge_matrix(torch.stack(tuned) - base)


@register("tsv", TsvParams, "Task Singular Vectors: per-task top ⌊r/T⌋ triplets, orthogonalised")
class Tsv(_SingularMerger):
    params: TsvParams

    def merge_matrix(self, taus: torch.Tensor) -> torch.Tensor:
        return tsv_merge(taus, self.params.svd_solver)


@register("iso_c", IsoCParams, "isotropic merge: flatten the spectrum of Σt τt to its mean")
class IsoC(_SingularMerger):
    params: IsoCParams

    def merge_matrix(self, taus: torch.Tensor) -> torch.Tensor:
        return iso_c_merge(taus.sum(dim=0))


@register("iso_cts", IsoCtsParams, "isotropic merge of a common subspace plus task-specific subspaces")
class IsoCts(_SingularMerger):
    params: IsoCtsParams

    def merge_matrix(self, taus: torch.Tensor) -> torch.Tensor:
        return iso_cts_merge(taus, self.params.common_fraction, self.params.svd_solver)
