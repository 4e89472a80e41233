"""Model Breadcrumbs (Davari & Belilovsky 2024): drop each task vector's outliers and its negligible
entries, keep the middle, then task arithmetic.

Two references disagree on the unit of the mask, so both are here:

- ``variant: official`` (default; the authors' ``TaskVectorMiddleKeep``, rezazzr/breadcrumbs f89fc664):
  per row of the last dimension (a 1-D tensor is one row; 0-D tensors keep their τ), with n the row
  length, zero the ⌊n·gamma⌋ entries of largest |τ|, then keep the ⌊n·density⌋ largest of what remains.
- ``variant: mergekit`` (mergekit 0.1.5 ``breadcrumbs``): per tensor of n entries, target = ⌊density·n⌋,
  n_top = ⌊gamma·n⌋, n_bot = max(0, n − target − n_top); sorting |τ| ascending (in float32, as
  mergekit does on the CPU), keep sorted positions [n_bot, n_bot + target); density ≥ 1 keeps all.

Ties in |τ| at a cut go by position (stable sort), the same on every device and dtype path; the
references leave them to torch.topk / torch.sort, whose choice among equal values is unspecified.
merged = Σt wt·τ̃t (wt = 1 unless ``weights``); with ``sign_election`` (mergekit ``breadcrumbs_ties``) only
entries whose sign equals the majority sign(Σt wt·τ̃t) (+1 where the sum is ≥ 0) are summed.
θ = θ0 + scaling·merged, every float key.
"""

from __future__ import annotations

from typing import Literal, Self

import torch
from pydantic import Field, model_validator

from mergeflow.methods.gta import consensus_mix, l1_rescaled, weighted_sum
from mergeflow.methods.registry import Affine, MergeContext, Merger, MethodParams, per_task_values, register


def middle_keep_rows(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Per row of the last dimension: zero the ⌊n·gamma⌋ largest |τ|, keep the next ⌊n·density⌋."""
    if tau.ndim == 0:
        return tau.clone()
    n = tau.shape[-1]
    rows = tau.reshape(-1, n)
    n_top, n_keep = int(n * gamma), int(n * density)
    order = torch.argsort(rows.abs(), dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(rows, dtype=torch.bool)
    keep.scatter_(1, order[:, n_top : n_top + n_keep], True)
    return (rows * keep).reshape(tau.shape)


def middle_keep_tensor(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Per tensor (mergekit): keep sorted-ascending positions [n_bot, n_bot + ⌊density·n⌋) of |τ|."""
    if density >= 1.0:
        return tau.clone()
    flat = tau.reshape(-1)
    n = flat.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = torch.argsort(flat.abs().to(torch.float32), stable=True)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order[n_bot : n_bot + target]] = True
    return (flat * keep).reshape(tau.shape)


def sign_elected_sum(masked: torch.Tensor) -> torch.Tensor:
    """Σ of the entries whose sign equals the majority sign(Σt τ̃t) (+1 where the sum is ≥ 0)."""
    majority = torch.where(masked.sum(dim=0) >= 0, 1.0, -1.0).to(masked.dtype)
    return (masked * (torch.sign(masked) == majority)).sum(dim=0)


class BreadcrumbsParams(MethodParams):
    variant: Literal["official", "mergekit"] = Field(
        "official", description="mask per row of the last dimension (official) or per tensor (mergekit)"
    )
    density: float = Field(0.15, gt=0.0, le=1.0, description="β: share of entries kept (after the outliers)")
    gamma: float = Field(0.006, ge=0.0, lt=1.0, description="γ: share of largest-magnitude entries dropped")
    sign_election: bool = Field(False, description="sum only entries agreeing with the majority sign (mergekit ties)")
    weights: tuple[float, ...] | None = Field(None, description="wt of Σt wt·τ̃t, one per fine-tune (default 1)")
    rescale: bool = Field(False, description="variant mergekit: scale the kept entries to τt's L1 norm")

    @model_validator(mode="after")
    def _rescale_variant(self) -> Self:
        if self.rescale and self.variant != "mergekit":
            raise ValueError("rescale needs variant mergekit")
        return self

    scaling: float = Field(0.4, description="α in θ0 + α·merged")


@register("breadcrumbs", BreadcrumbsParams, "drop each τt's largest and smallest entries, keep the middle; θ0 + α·Σ")
class Breadcrumbs(Merger):
    params: BreadcrumbsParams

    def __init__(self, params: BreadcrumbsParams, ctx: MergeContext):
        super().__init__(params, ctx)
        weights = params.weights
        self.weights = None if weights is None else per_task_values(weights, ctx, "breadcrumbs", "weights")

    def affine(self, key: str, base: torch.Tensor, tuned: list[torch.Tensor]) -> Affine:
        """A = θ0, D = Σt wt·middle(τt) (sign-elected with ``sign_election``, on the weighted τ̃t as mergekit)."""
        p = self.params
        keep = middle_keep_rows if p.variant == "official" else middle_keep_tensor
        masked = [keep(t - base, p.density, p.gamma) for t in tuned]
        if p.rescale:
            masked = [l1_rescaled(t - base, m) for t, m in zip(tuned, masked, strict=True)]
        if p.sign_election:
            if self.weights is None:
                return base, sign_elected_sum(torch.stack(masked))
            return base, consensus_mix(torch.stack(masked), self.weights, normalize=False)
        return base, weighted_sum(masked, self.weights)
