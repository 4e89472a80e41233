"""Weight averaging and task arithmetic."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergeflow.methods.gta import weighted_sum
from mergeflow.methods.registry import Affine, MergeContext, Merger, MethodParams, per_task_values, register

TaskWeights = tuple[float, ...] | None
"""wt: one coefficient per fine-tune in the user's order (mergekit's per-model ``weight``), or None."""


def weight_average(tuned: Sequence[torch.Tensor]) -> torch.Tensor:
    """θ_avg = (1/T) Σt θt."""
    total = tuned[0].clone()
    for tensor in tuned[1:]:
        total += tensor
    return total / len(tuned)


def task_vector_sum(base: torch.Tensor, tuned: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σt τt with τt = θt − θ0."""
    total = tuned[0] - base
    for tensor in tuned[1:]:
        total += tensor - base
    return total


def canonical_weights(weights: TaskWeights, ctx: MergeContext, method: str) -> list[float] | None:
    """The user-order weights in canonical task order (None stays None)."""
    return None if weights is None else per_task_values(weights, ctx, method, "weights")


class WeightAverageParams(MethodParams):
    weights: TaskWeights = Field(None, description="wt of Σt wt·θt, one per fine-tune (default: 1/T each)")


class TaskArithmeticParams(MethodParams):
    scaling: float = Field(0.3, description="λ in θ0 + λ·Σt wt·τt")
    weights: TaskWeights = Field(None, description="wt, one per fine-tune (default: 1 each)")


@register("weight_average", WeightAverageParams, "mean of the fine-tuned weights, (1/T)·Σt θt, or Σt wt·θt")
class WeightAverage(Merger):
    params: WeightAverageParams

    def __init__(self, params: WeightAverageParams, ctx: MergeContext):
        super().__init__(params, ctx)
        self.weights = canonical_weights(params.weights, ctx, "weight_average")

    def merge(self, key: str, base: torch.Tensor, tuned: list[torch.Tensor]) -> torch.Tensor:
        """(1/T)·Σt θt, or Σt wt·θt with ``weights``."""
        return weight_average(tuned) if self.weights is None else weighted_sum(tuned, self.weights)


@register("task_arithmetic", TaskArithmeticParams, "θ0 + scaling·Σt τt (Σt wt·τt with weights)")
class TaskArithmetic(Merger):
    params: TaskArithmeticParams

    def __init__(self, params: TaskArithmeticParams, ctx: MergeContext):
        super().__init__(params, ctx)
        self.weights = canonical_weights(params.weights, ctx, "task_arithmetic")

    def affine(self, key: str, base: torch.Tensor, tuned: list[torch.Tensor]) -> Affine:
        """A = θ0, D = Σt τt (Σt wt·τt with ``weights``)."""
        if self.weights is None:
            return base, task_vector_sum(base, tuned)
        return base, weighted_sum([t - base for t in tuned], self.weights)
