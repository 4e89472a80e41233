"""Consensus merging with TALL masks (Wang et al., "Localizing Task Information")."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import AfterValidator, Field

from mergeflow.errors import ConfigError
from mergeflow.methods.registry import Affine, MergeContext, Merger, MethodParams, per_task_values, register


def tall_masks(taus: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """mask_t = |τt| > λt · |Σs τs − τt| (strict), stacked over tasks."""
    total = taus.sum(dim=0)
    view = lambdas.reshape((-1,) + (1,) * (taus.ndim - 1))
    return taus.abs() > view * (total - taus).abs()


def consensus_merge(taus: torch.Tensor, lambdas: torch.Tensor, min_tasks: int) -> torch.Tensor:
    """(Σt τt) ⊙ 1[Σt mask_t ≥ min_tasks]: keep weights that at least ``min_tasks`` tasks use."""
    votes = tall_masks(taus, lambdas).sum(dim=0)
    return taus.sum(dim=0) * (votes >= min_tasks)


def _non_negative(value: float | tuple[float, ...]) -> float | tuple[float, ...]:
    values = value if isinstance(value, tuple) else (value,)
    if not values or any(v < 0 for v in values):
        raise ValueError("mask_lambda must be non-negative (one value or one per task)")
    return value


MaskLambda = Annotated[float | tuple[float, ...], AfterValidator(_non_negative)]
"""λt of TALL masks: one non-negative value for every task, or one per task in the user's order."""


def per_task_lambdas(value: float | tuple[float, ...], ctx: MergeContext, method: str) -> torch.Tensor:
    """λt in canonical task order from one value or one per task in the user's order."""
    return torch.tensor(per_task_values(value, ctx, method, "mask_lambda"), dtype=ctx.dtype, device=ctx.device)


class ConsensusParams(MethodParams):
    mask_lambda: MaskLambda = Field(0.4, description="λt of the TALL masks: one value or one per task")
    min_tasks: int = Field(2, ge=0, description="keep weights used by at least this many tasks")
    scaling: float = Field(1.0, description="α in θ0 + α·(consensus ⊙ Σt τt)")


@register("consensus", ConsensusParams, "TALL masks on Σt τt, keep weights used by ≥ min_tasks tasks")
class Consensus(Merger):
    params: ConsensusParams

    def __init__(self, params: ConsensusParams, ctx: MergeContext):
        super().__init__(params, ctx)
        if params.min_tasks > ctx.num_tasks:
            raise ConfigError(
                f"consensus: min_tasks={params.min_tasks} with {ctx.num_tasks} fine-tune(s): no weight can be used by "
                f"that many tasks, so the result would be θ0; use min_tasks <= {ctx.num_tasks}"
            )
        self.lambdas = per_task_lambdas(params.mask_lambda, ctx, "consensus")

    def affine(self, key: str, base: torch.Tensor, tuned: list[torch.Tensor]) -> Affine:
        """A = θ0, D = consensus mask ⊙ Σt τt."""
        taus = torch.stack(tuned) - base
        return base, consensus_merge(taus, self.lambdas, self.params.min_tasks)
