"""Per-task (compressed) methods: one model per task, rebuilt from what is stored for it.

Beside ``cart_indexing`` (mergeflow.methods.cart):

- ``tsv_c`` (TSV compression, Gargiulo et al. 2025; official ``TSVC_utils``): per task, every 2-D key
  keeps its own top k = ⌊min(m, n)·sv_reduction⌋ singular triplets of τt (sv_reduction 1/T by default);
  every other key keeps the whole τt. θ̂t = θ0 + scaling·τ̂t (scaling 1 in the reference).
- ``tall_masks`` (Wang et al. 2024; official ``tallmask_utils``): τ_MTL = Σs τs;
  m_t = |τt| > λt·|τ_MTL − τt| (strict), every float key; θ̂t = θ0 + scaling·(m_t ⊙ τ_MTL).
- ``emr`` (EMR-merging, Huang et al. 2024; FusionBench 0.2.33 ``emr_merge`` = official code): every
  float key, flag = +1 where Σt τt > 0, else −1; mask_t = τt·flag > 0; τ_uni = flag·maxt |mask_t ⊙ τt|;
  rescaler_t = Σ_keys mean|τt| / Σ_keys mean|τ_uni ⊙ mask_t|, both sums accumulated in float32 one key
  at a time as the reference does (keys in sorted order; ``accumulate: float64`` on request);
  θ̂t = θ0 + scaling·rescaler_t·(τ_uni ⊙ mask_t).

Each reports its storage beyond θ0 (``storage_cost``): what one would keep to rebuild every task's
model — shared tensors once, and per task its triplets (k·(m + n + 1) values), masks (one bit per
entry, packed per key) or rescaler.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mergeflow.linalg import low_rank
from mergeflow.methods.consensus import MaskLambda, per_task_lambdas, tall_masks
from mergeflow.methods.registry import (
    Affine,
    MergeContext,
    Merger,
    MethodParams,
    StorageCost,
    TensorSource,
    float_bytes,
    register,
)


def sv_rank(shape: tuple[int, ...], sv_reduction: float) -> int:
    """k = ⌊min(m, n)·sv_reduction⌋, as ``int(len(s) * sv_reduction)`` in the reference."""
    return int(min(shape) * sv_reduction)


def mask_bytes(numel: int) -> int:
    """Bytes of one packed binary mask over ``numel`` entries (numpy.packbits of one key)."""
    return (numel + 7) // 8


class TsvCParams(MethodParams):
    sv_reduction: float | None = Field(
        None, gt=0.0, le=1.0, description="share of each matrix's singular values kept per task; null: 1/T"
    )
    scaling: float = Field(1.0, description="α in θ0 + α·τ̂t (1 in the reference)")


@register("tsv_c", TsvCParams, "one model per task: θ0 + scaling·(top ⌊min(m,n)/T⌋ triplets of τt) on 2-D keys")
class TsvC(Merger):
    params: TsvCParams
    per_task_outputs = True

    def reduction(self) -> float:
        return self.params.sv_reduction if self.params.sv_reduction is not None else 1.0 / self.ctx.num_tasks

    def affine(self, key: str, base: torch.Tensor, tuned: list[torch.Tensor]) -> list[Affine]:
        """Per task: A = θ0, D = SVD_k(τt) on 2-D keys, τt elsewhere."""
        if base.ndim != 2:
            return [(base, t - base) for t in tuned]
        k = sv_rank(tuple(base.shape), self.reduction())
        return [(base, low_rank(t - base, k, "full")) for t in tuned]

    def storage_cost(self) -> StorageCost:
        per_task = 0
        for meta in self.ctx.layout.values():
            if not meta.is_float:
                continue
            size = meta.dtype.itemsize
            if len(meta.shape) == 2:
                m, n = meta.shape
                per_task += min(sv_rank(meta.shape, self.reduction()) * (m + n + 1), m * n) * size
            else:
                per_task += meta.numel * size
        return StorageCost(shared=0, per_task=per_task)


class TallMasksParams(MethodParams):
    mask_lambda: MaskLambda = Field(0.4, description="λt of m_t: one value or one per task")
    scaling: float = Field(1.0, description="α in θ0 + α·(m_t ⊙ τ_MTL) (1 in the reference)")


@register("tall_masks", TallMasksParams, "one model per task: θ0 + scaling·(m_t ⊙ Σs τs), m_t the TALL mask of t")
class TallMasks(Merger):
    params: TallMasksParams
    per_task_outputs = True

    def __init__(self, params: TallMasksParams, ctx: MergeContext):
        super().__init__(params, ctx)
        self.lambdas = per_task_lambdas(params.mask_lambda, ctx, "tall_masks")

    def affine(self, key: str, base: torch.Tensor, tuned: list[torch.Tensor]) -> list[Affine]:
        """Per task: A = θ0, D = m_t ⊙ τ_MTL."""
        taus = torch.stack(tuned) - base
        total = taus.sum(dim=0)
        masks = tall_masks(taus, self.lambdas)
        return [(base, total * mask) for mask in masks]

    def storage_cost(self) -> StorageCost:
        masks = sum(mask_bytes(m.numel) for m in self.ctx.layout.values() if m.is_float)
        return StorageCost(shared=float_bytes(self.ctx.layout), per_task=masks)


class EmrParams(MethodParams):
    accumulate: Literal["float32", "float64"] = Field(
        "float32", description="dtype of the rescalers' sums over keys (float32: as the reference)"
    )
    scaling: float = Field(1.0, description="α in θ0 + α·rescaler_t·(τ_uni ⊙ mask_t) (1 in the reference)")


def emr_unified(taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ_uni, masks) of stacked τt: flag = sign of Σt τt (0 → −1), mask_t = τt·flag > 0,
    τ_uni = flag·maxt |mask_t ⊙ τt|."""
    flag = torch.where(taus.sum(dim=0) > 0, 1.0, -1.0).to(taus.dtype)
    masks = taus * flag > 0
    unified = flag * (taus * masks).abs().amax(dim=0)
    return unified, masks


@register("emr", EmrParams, "one model per task: elected τ_uni, per-task masks and rescalers (EMR-merging)")
class Emr(Merger):
    params: EmrParams
    per_task_outputs = True

    def prepare(self, source: TensorSource) -> None:
        """rescaler_t = Σ_keys mean|τt| / Σ_keys mean|τ_uni ⊙ mask_t| over every float key."""
        dtype = torch.float32 if self.params.accumulate == "float32" else torch.float64
        numerator = torch.zeros(self.ctx.num_tasks, dtype=dtype)
        denominator = torch.zeros(self.ctx.num_tasks, dtype=dtype)
        for _, base, tuned in source.iter_all(self.ctx.float_keys):
            taus = torch.stack(tuned) - base
            unified, masks = emr_unified(taus)
            for t in range(self.ctx.num_tasks):  # 0-dim += 0-dim: added in the wider dtype, then rounded
                numerator[t] += taus[t].abs().mean().cpu()
                denominator[t] += (unified * masks[t]).abs().mean().cpu()
        self.rescalers = (numerator / denominator).tolist()

    def affine(self, key: str, base: torch.Tensor, tuned: list[torch.Tensor]) -> list[Affine]:
        """Per task: A = θ0, D = rescaler_t·(τ_uni ⊙ mask_t)."""
        unified, masks = emr_unified(torch.stack(tuned) - base)
        return [(base, rescaler * (unified * mask)) for rescaler, mask in zip(self.rescalers, masks, strict=True)]

    def storage_cost(self) -> StorageCost:
        masks = sum(mask_bytes(m.numel) for m in self.ctx.layout.values() if m.is_float)
        return StorageCost(shared=float_bytes(self.ctx.layout), per_task=masks + 4)  # + one float32 rescaler
