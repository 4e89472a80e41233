"""MagMax (Marczak et al. 2024): per entry, the task vector of largest magnitude.

τ_max = τ1; for t = 2..T: τ_max = where(|τt| ≥ |τ_max|, τt, τ_max), so at an exact tie of magnitudes
the later task wins (sign included), as in FusionBench 0.2.33 ``magmax_merge`` and the official
``merge_max_abs``. Every float key. θ = θ0 + scaling·τ_max. Tasks run in mergeflow's canonical
(sha256) order, so only an exact opposite-sign tie can differ from a reference run in another order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergeflow.methods.registry import Affine, Merger, MethodParams, register


def max_magnitude(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """τ_max: entrywise the τt with the largest |τt|, the later task on ties."""
    running = taus[0].clone()
    for tau in taus[1:]:
        running = torch.where(tau.abs() >= running.abs(), tau, running)
    return running


class MagMaxParams(MethodParams):
    scaling: float = Field(0.5, description="α in θ0 + α·τ_max")


@register("magmax", MagMaxParams, "per entry the task vector of largest magnitude; θ0 + scaling·τ_max")
class MagMax(Merger):
    params: MagMaxParams

    def affine(self, key: str, base: torch.Tensor, tuned: list[torch.Tensor]) -> Affine:
        """A = θ0, D = τ_max."""
        return base, max_magnitude([t - base for t in tuned])
