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

``variant: mergekit`` is mergekit 0.1.5's ``dare_ties`` (``combine: ties``) / ``dare_linear``
(``combine: ta``) with these seeded masks in place of mergekit's global-RNG ones: p one value or one
per task (mergekit's density is 1 − p; p = 0 leaves τ untouched), ``rescale`` scales the survivors
to τ's L1 norm (:func:`mergeflow.methods.gta.l1_rescaled`), ``weights`` wt per task; ``ties``: no
magnitude trim, the weighted sign consensus of :mod:`mergeflow.methods.gta`, ``merge: mean``
normalising by the agreeing weights; ``ta``: Σt wt·τ̃t.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal, Self

import torch
from pydantic import AfterValidator, Field, model_validator

from mergeflow.methods.gta import consensus_mix, l1_rescaled, weighted_sum
from mergeflow.methods.registry import Affine, MergeContext, TensorSource, per_task_values, register
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


def _drop_rates(value: float | tuple[float, ...]) -> float | tuple[float, ...]:
    values = value if isinstance(value, tuple) else (value,)
    if not values or any(not 0.0 <= v < 1.0 for v in values):
        raise ValueError("drop_rate must be in [0, 1) (one value or one per task)")
    return value


DropRate = Annotated[float | tuple[float, ...], AfterValidator(_drop_rates)]


class DareParams(TiesCommonParams):
    drop_rate: DropRate = Field(
        0.5, description="p: probability of dropping each task-vector entry (variant mergekit: or one per task)"
    )
    rescale: bool = Field(True, description="rescale the survivors: by 1/(1 − p), or to τ's L1 norm (mergekit)")
    combine: Literal["ta", "ties"] = Field("ta", description="task arithmetic or TIES on the dropped task vectors")
    seed: int = Field(0, ge=0, description="seed of the drop masks (recorded with the output)")
    density: float = Field(0.2, gt=0.0, le=1.0, description="combine: ties: fraction of entries kept per task")
    merge: Literal["mean", "sum", "max"] = Field("sum", description="combine: ties: disjoint merge rule")
    scope: Literal["global", "tensor"] = Field("global", description="combine: ties: top-k over the model or tensor")
    scaling: float = Field(0.3, description="λ in θ0 + λ·merged")
    variant: Literal["reference", "mergekit"] = Field(
        "reference", description="FusionBench's DARE, or mergekit 0.1.5's dare_ties/dare_linear with seeded masks"
    )
    weights: tuple[float, ...] | None = Field(None, description="variant mergekit: wt, one per fine-tune (default 1)")

    @model_validator(mode="after")
    def _variant_fields(self) -> Self:
        if self.variant == "reference":
            if self.weights is not None or isinstance(self.drop_rate, tuple):
                raise ValueError("weights and per-task drop rates need variant mergekit")
        elif {"density", "scope"} & self.model_fields_set or self.merge == "max":
            raise ValueError(
                "variant mergekit does not trim by magnitude (no density or scope) and merges by mean or sum"
            )
        return self


@register("dare", DareParams, "drop task-vector entries with probability p, rescale by 1/(1−p), then TA or TIES")
class Dare(Ties):
    params: DareParams

    def __init__(self, params: DareParams, ctx: MergeContext):
        super().__init__(params, ctx)
        self.mergekit_dare = params.variant == "mergekit"
        self.rates = per_task_values(params.drop_rate, ctx, "dare", "drop_rate")
        self.task_weights = per_task_values(1.0 if params.weights is None else params.weights, ctx, "dare", "weights")

    def prepare(self, source: TensorSource) -> None:
        if self.params.combine == "ties" and not self.mergekit_dare:
            super().prepare(source)

    def task_vector(self, key: str, position: int, base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
        """τ̃ of one task: its τ with this (key, task)'s drop mask applied and rescaled."""
        p = self.params
        rate = self.rates[position]
        if self.mergekit_dare and rate == 0.0:
            return tuned - base  # mergekit: density 1 keeps τ as it is
        keep = drop_mask(tuple(base.shape), rate, p.seed, key, position)
        if self.mergekit_dare:
            tau = tuned - base
            dropped = tau * keep.to(tau.device)
            return l1_rescaled(tau, dropped) if p.rescale else dropped
        return drop_and_rescale(tuned - base, keep, rate, p.rescale)

    def affine(self, key: str, base: torch.Tensor, tuned: list[torch.Tensor]) -> Affine:
        """A = θ0; D = Σt τ̃t (ta) or the TIES merge of the τ̃t (ties); mergekit's weighted forms."""
        if self.mergekit_dare:
            taus = [self.task_vector(key, t, base, theta) for t, theta in enumerate(tuned)]
            if self.params.combine == "ties":
                return base, consensus_mix(torch.stack(taus), self.task_weights, self.params.merge == "mean")
            return base, weighted_sum(taus, self.task_weights)
        if self.params.combine == "ties":
            return super().affine(key, base, tuned)
        total = self.task_vector(key, 0, base, tuned[0])
        for position, theta in enumerate(tuned[1:], 1):  # in order, as task_vector_sum: p = 0 is TA bit for bit
            total += self.task_vector(key, position, base, theta)
        return base, total
