"""Weight averaging and task arithmetic."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergeflow.methods.registry import Affine, Merger, MethodParams, register


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


class WeightAverageParams(MethodParams):
    pass


class TaskArithmeticParams(MethodParams):
    scaling: float = Field(0.3, description="λ in θ0 + λ·Σt τt")


@register("weight_average", WeightAverageParams, "mean of the fine-tuned weights, (1/T)·Σt θt")
class WeightAverage(Merger):
    def merge(self, key: str, base: torch.Tensor, tuned: list[torch.Tensor]) -> torch.Tensor:
        return weight_average(tuned)


@register("task_arithmetic", TaskArithmeticParams, "θ0 + scaling·Σt τt")
class TaskArithmetic(Merger):
    params: TaskArithmeticParams

    def affine(self, key: str, base: torch.Tensor, tuned: list[torch.Tensor]) -> Affine:
        """A = θ0, D = Σt τt."""
        return base, task_vector_sum(base, tuned)
