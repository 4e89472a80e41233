"""TIES merging: trim each task vector, elect a sign per entry, merge the agreeing entries.

Matches the original TIES code and FusionBench: with ``scope='global'`` one top-k per task over the
whole flattened model (every float key, 1-D included); with ``scope='tensor'`` one per tensor (the
mergekit/PEFT convention).

``variant: mergekit`` is mergekit 0.1.5's ``ties`` instead (see :mod:`mergeflow.methods.gta`): per
tensor, exactly max(1, ⌊density·n⌋) entries kept per task, a density and a weight per task, the
sign elected on the weighted τt (+1 where their sum is ≥ 0), and ``merge: mean`` dividing by the
sum of the agreeing tasks' weights (mergekit's ``normalize``), ``sum`` not dividing; ``rescale``
scales each task's kept entries to its τ's L1 norm.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

import torch
from pydantic import AfterValidator, Field, model_validator

from mergeflow.methods.gta import consensus_mix, l1_rescaled, magnitude_keep
from mergeflow.methods.registry import (
    Affine,
    MergeContext,
    Merger,
    MethodParams,
    TensorSource,
    per_task_values,
    register,
)


def trim_threshold(abs_values: torch.Tensor, density: float) -> float:
    """|τ| threshold keeping the top ``density`` fraction: the (d − ⌊d·density⌋)-th smallest |τ|.

    Every entry with |τ| ≥ threshold is kept (⌊d·density⌋ + 1 entries plus ties at the threshold).
    density 1 keeps everything. On the CPU the values are reordered in place (callers pass a buffer
    they own).
    """
    flat = abs_values.reshape(-1)
    d = flat.numel()
    k = d - int(d * density)
    if k <= 0 or d == 0:
        return float("-inf")
    if flat.device.type == "cpu":
        # introselect in place: no copy of the values and no int64 index tensor (kthvalue makes both)
        array = flat.contiguous().numpy()
        array.partition(k - 1)
        return float(array[k - 1])
    return flat.kthvalue(k).values.item()


def trim(taus: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Zero every entry of task t with |τt| below thresholds[t]; ``taus`` is stacked over tasks."""
    view = thresholds.reshape((-1,) + (1,) * (taus.ndim - 1))
    return taus * (taus.abs() >= view)


def elect_sign(trimmed: torch.Tensor, zero_sign: torch.Tensor | float) -> torch.Tensor:
    """γ = sign(Σt trimmed τt); entries where the sum is exactly 0 take ``zero_sign``."""
    sign = torch.sign(trimmed.sum(dim=0))
    return torch.where(sign == 0, torch.as_tensor(zero_sign, dtype=sign.dtype, device=sign.device), sign)


def disjoint_merge(trimmed: torch.Tensor, sign: torch.Tensor, merge: str) -> torch.Tensor:
    """Combine the entries that agree with γ (τ > 0 where γ > 0, τ < 0 elsewhere).

    sum: Σ selected; mean: Σ selected / max(1, #nonzero selected); max: γ · max |selected|.
    """
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * agree
    if merge == "sum":
        return selected.sum(dim=0)
    if merge == "mean":
        count = (selected != 0).sum(dim=0).clamp(min=1)
        return selected.sum(dim=0) / count
    if merge == "max":
        return selected.abs().amax(dim=0) * sign
    raise ValueError(f"unknown TIES merge rule {merge!r}")


class TiesCommonParams(MethodParams):
    density: float = Field(0.2, gt=0.0, le=1.0, description="fraction of entries kept per task")
    merge: Literal["mean", "sum", "max"] = Field("mean", description="disjoint merge rule")
    scope: Literal["global", "tensor"] = Field("global", description="top-k over the whole model or per tensor")
    scaling: float = Field(1.0, description="λ in θ0 + λ·merged")


def _densities(value: float | tuple[float, ...]) -> float | tuple[float, ...]:
    values = value if isinstance(value, tuple) else (value,)
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise ValueError("density must be in (0, 1] (one value or one per task)")
    return value


Density = Annotated[float | tuple[float, ...], AfterValidator(_densities)]


class TiesParams(TiesCommonParams):
    density: Density = Field(  # type: ignore[assignment]
        0.2, description="fraction of entries kept per task (variant mergekit: or one per task)"
    )
    variant: Literal["reference", "mergekit"] = Field(
        "reference", description="the TIES paper's rule, or mergekit 0.1.5's ties (per tensor, weighted)"
    )
    weights: tuple[float, ...] | None = Field(None, description="variant mergekit: wt, one per fine-tune (default 1)")
    rescale: bool = Field(False, description="variant mergekit: scale the kept entries to τt's L1 norm")

    @model_validator(mode="after")
    def _variant_fields(self) -> Self:
        if self.variant == "reference":
            if self.weights is not None or isinstance(self.density, tuple) or self.rescale:
                raise ValueError("weights, per-task densities and rescale need variant mergekit")
        elif self.scope != "tensor" or self.merge == "max":
            raise ValueError("variant mergekit is per tensor with merge mean or sum: set scope tensor")
        return self


@register("ties", TiesParams, "trim to top density, elect sign, disjoint merge; θ0 + scaling·merged")
class Ties(Merger):
    params: TiesParams

    def __init__(self, params: TiesCommonParams, ctx: MergeContext):
        super().__init__(params, ctx)
        self.mergekit = isinstance(params, TiesParams) and params.variant == "mergekit"
        if self.mergekit:
            assert isinstance(params, TiesParams)
            self.densities = per_task_values(params.density, ctx, "ties", "density")
            self.weights = per_task_values(1.0 if params.weights is None else params.weights, ctx, "ties", "weights")

    def prepare(self, source: TensorSource) -> None:
        self.thresholds: torch.Tensor | None = None
        self.majority: float = 0.0
        if self.params.scope != "global":
            return
        keys = self.ctx.float_keys
        total = sum(self.ctx.layout[k].numel for k in keys)
        thresholds = []
        for task in range(self.ctx.num_tasks):
            # One task's |τ| over the whole model: memory is one model, whatever T is.
            buffer = torch.empty(total, dtype=self.ctx.dtype, device=self.ctx.device)
            offset = 0
            for key, base, tuned in source.iter_task(keys, task):
                n = base.numel()
                buffer[offset : offset + n].view(base.shape).copy_(self.task_vector(key, task, base, tuned)).abs_()
                offset += n
            thresholds.append(trim_threshold(buffer, self.params.density))
            del buffer
        self.thresholds = torch.tensor(thresholds, dtype=self.ctx.dtype, device=self.ctx.device)
        # Zero-sum entries take the sign of Σ γ over the whole model (a second pass).
        sign_total = 0
        for key, base, tuned in source.iter_all(keys):
            trimmed = trim(self.task_vectors(key, base, tuned), self.thresholds)
            sign_total += int(torch.sign(trimmed.sum(dim=0)).sum().item())
        self.majority = float((sign_total > 0) - (sign_total < 0))

    def task_vector(self, key: str, position: int, base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
        """τ of the task in canonical ``position`` for ``key``: θt − θ0 (DARE drops entries first)."""
        return tuned - base

    def task_vectors(self, key: str, base: torch.Tensor, tuned: list[torch.Tensor]) -> torch.Tensor:
        """Stacked τt of every task, canonical order."""
        return torch.stack([self.task_vector(key, t, base, theta) for t, theta in enumerate(tuned)])

    def affine(self, key: str, base: torch.Tensor, tuned: list[torch.Tensor]) -> Affine:
        """A = θ0, D = disjoint merge of the trimmed, sign-elected τt (mergekit's weighted mix)."""
        if self.mergekit:
            kept = [magnitude_keep(t - base, d) for t, d in zip(tuned, self.densities, strict=True)]
            if self.params.rescale:
                kept = [l1_rescaled(t - base, k) for t, k in zip(tuned, kept, strict=True)]
            return base, consensus_mix(torch.stack(kept), self.weights, self.params.merge == "mean")
        taus = self.task_vectors(key, base, tuned)
        if self.params.scope == "global":
            assert self.thresholds is not None, "prepare() must run before merge()"
            thresholds, zero_sign = self.thresholds, self.majority
            trimmed = trim(taus, thresholds)
        else:
            thresholds = torch.tensor(
                [trim_threshold(t.abs(), self.params.density) for t in taus], dtype=taus.dtype, device=taus.device
            )
            trimmed = trim(taus, thresholds)
            zero_sign = torch.sign(torch.sign(trimmed.sum(dim=0)).sum())
        sign = elect_sign(trimmed, zero_sign)
        return base, disjoint_merge(trimmed, sign, self.params.merge)
