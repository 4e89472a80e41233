"""DARE (Yu et al. 2024, "Language Models are Super Mario"): drop and rescale, then merge.

Per key and task: keep = u > p with u uniform on [0, 1) (strict, as FusionBench 0.2.33
``method/dare/utils.py``), τ̃t = τt ⊙ keep / (1 − p) (``rescale``; τt ⊙ keep without it). Then
``combine: ta`` gives θ0 + λ·Σt τ̃t (FusionBench ``DareTaskArithmetic``), ``combine: ties`` gives TIES
on the τ̃t (FusionBench ``DareTiesMerging``: global top-``density`` trim, sign election, disjoint
``merge``), θ0 + λ·merged. Every float key.

Seeded and bit-reproducible, unlike the references (which draw from torch's global RNG in call
order): u for (key, task) comes from a CPU generator seeded with sha256(seed, key, canonical task
position), drawn in float32 whatever the compute dtype or device, so the drop mask depends on
nothing else. The seed is a parameter, so it is recorded in every output's metadata.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
from pydantic import Field

from mergeflow.methods.registry import Affine, TensorSource, register
from mergeflow.methods.ties import Ties, TiesCommonParams


def drop_mask(shape: tuple[int, ...], drop_rate: float, seed: int, key: str, position: int) -> torch.Tensor:
    """keep = u > p, u ~ U[0, 1) in float32 from a generator seeded by (seed, key, task position)."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{position}".encode()).digest()
    generator = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.rand(shape, generator=generator, dtype=torch.float32) > drop_rate


def drop_and_rescale(tau: torch.Tensor, keep: torch.Tensor, drop_rate: float, rescale: bool) -> torch.Tensor:
    """τ̃ = τ ⊙ keep / (1 − p) (or τ ⊙ keep without rescaling)."""
    dropped = tau * keep.to(tau.device)
    return dropped / (1.0 - drop_rate) if rescale else dropped


class DareParams(TiesCommonParams):
    drop_rate: float = Field(0.5, ge=0.0, lt=1.0, description="p: probability of dropping each task-vector entry")
    rescale: bool = Field(True, description="divide the survivors by 1 − p")
    combine: Literal["ta", "ties"] = Field("ta", description="task arithmetic or TIES on the dropped task vectors")
    seed: int = Field(0, ge=0, description="seed of the drop masks (recorded with the output)")
    density: float = Field(0.2, gt=0.0, le=1.0, description="combine: ties: fraction of entries kept per task")
    merge: Literal["mean", "sum", "max"] = Field("sum", description="combine: ties: disjoint merge rule")
    scope: Literal["global", "tensor"] = Field("global", description="combine: ties: top-k over the model or tensor")
    scaling: float = Field(0.3, description="λ in θ0 + λ·merged")


@register("dare", DareParams, "drop task-vector entries with probability p, rescale by 1/(1−p), then TA or TIES")
class Dare(Ties):
    params: DareParams

    def prepare(self, source: TensorSource) -> None:
        if self.params.combine == "ties":
            super().prepare(source)

    def task_vector(self, key: str, position: int, base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
        """τ̃ of one task: its τ with this (key, task)'s drop mask applied and rescaled."""
        p = self.params
        keep = drop_mask(tuple(base.shape), p.drop_rate, p.seed, key, position)
        return drop_and_rescale(tuned - base, keep, p.drop_rate, p.rescale)

    def affine(self, key: str, base: torch.Tensor, tuned: list[torch.Tensor]) -> Affine:
        """A = θ0; D = Σt τ̃t (ta) or the TIES merge of the τ̃t (ties)."""
        if self.params.combine == "ties":
            return super().affine(key, base, tuned)
        total = self.task_vector(key, 0, base, tuned[0])
        for position, theta in enumerate(tuned[1:], 1):  # in order, as task_vector_sum: p = 0 is TA bit for bit
            total += self.task_vector(key, position, base, theta)
        return base, total
