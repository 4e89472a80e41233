"""LiNeS (Wang et al. 2025, "Post-training layer scaling"): scale a merged task vector by depth.

τ_m is the merged task vector of the ``base`` method at scaling 1 (``ta``: Σt τt; ``ties``: TIES's
disjoint merge; ``consensus``: the TALL-mask consensus). Key k of layer ℓ gets

    θ_k = θ0_k + (α + β·ℓ/(L − 1))·τ_m,k

where ℓ is the first of 0..L−1 such that ".ℓ." is a substring of k (the official ``LiNeS_scaling``),
and keys with no such ℓ (embeddings, stems, final norms, projections) get α. α defaults to the
official (‖Σt τt‖₁ / ‖τ_m‖₁)/T over the whole model (1/T for ``ta``). The official code hard-codes
L = 12 (24 for ViT-L/14); here L defaults to the model's depth, 1 + the largest N with ".N." in a key
(``depth`` sets it). No other scaling: the method is not affine in any one parameter.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field

from mergeflow.methods.registry import (
    MergeContext,
    Merger,
    MethodParams,
    TensorSource,
    get_method,
    parse_params,
    register,
)

_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


def model_depth(keys: list[str]) -> int:
    """L = 1 + the largest N such that ".N." occurs in a key (1 when no key has one)."""
    found = [int(n) for key in keys for n in _INDEX.findall(key)]
    return 1 + max(found) if found else 1


def layer_of(key: str, depth: int) -> int | None:
    """The first ℓ in 0..depth−1 with ".ℓ." in ``key`` (the official rule), or None."""
    for layer in range(depth):
        if f".{layer}." in key:
            return layer
    return None


def layer_scale(key: str, depth: int, alpha: float, beta: float) -> float:
    """α + β·ℓ/(L − 1) for a key of layer ℓ; α for keys outside the layers (or L = 1)."""
    layer = layer_of(key, depth)
    if layer is None or depth <= 1:
        return alpha
    return alpha + beta * layer / (depth - 1)


class LinesParams(MethodParams):
    base: Literal["ta", "ties", "consensus"] = Field("ta", description="method giving the merged τ_m")
    beta: float = Field(0.5, ge=0.0, description="β: extra scaling of the deepest layer")
    alpha: float | None = Field(None, description="α: scaling of the shallowest layer; null: (‖Στt‖₁/‖τ_m‖₁)/T")
    depth: int | None = Field(None, ge=1, description="L: number of layers; null: inferred from the key names")
    density: float = Field(0.2, gt=0.0, le=1.0, description="base ties: fraction of entries kept per task")
    mask_lambda: float = Field(0.4, ge=0.0, description="base consensus: λ of the TALL masks")
    min_tasks: int = Field(2, ge=0, description="base consensus: keep weights used by at least this many tasks")


_BASES = {"ta": "task_arithmetic", "ties": "ties", "consensus": "consensus"}


@register("lines", LinesParams, "layer-increasing scaling of a merged τ: θ0 + (α + β·ℓ/(L−1))·τ_m")
class Lines(Merger):
    params: LinesParams

    def __init__(self, params: LinesParams, ctx: MergeContext):
        super().__init__(params, ctx)
        method = _BASES[params.base]
        values: dict[str, object] = {"scaling": 1.0}
        if params.base == "ties":
            values |= {"density": params.density, "merge": "mean"}
        elif params.base == "consensus":
            values |= {"mask_lambda": params.mask_lambda, "min_tasks": params.min_tasks}
        self.inner = get_method(method).merger(parse_params(method, values), ctx)
        self.depth = params.depth or model_depth(list(ctx.layout))
        self.alpha = (
            params.alpha if params.alpha is not None else (1.0 / ctx.num_tasks if params.base == "ta" else None)
        )

    def prepare(self, source: TensorSource) -> None:
        self.inner.prepare(source)
        if self.alpha is not None:
            return
        total_l1, merged_l1 = 0.0, 0.0
        for key, base, tuned in source.iter_all(self.ctx.float_keys):
            taus = torch.stack(tuned) - base
            _, direction = self.inner.affine(key, base, tuned)  # type: ignore[misc]
            total_l1 += float(taus.sum(dim=0).abs().sum())
            merged_l1 += float(direction.abs().sum()) if direction is not None else 0.0
        self.alpha = (total_l1 / merged_l1) / self.ctx.num_tasks if merged_l1 > 0 else 1.0 / self.ctx.num_tasks

    def merge(self, key: str, base: torch.Tensor, tuned: list[torch.Tensor]) -> torch.Tensor:
        _, direction = self.inner.affine(key, base, tuned)  # type: ignore[misc]
        assert self.alpha is not None, "prepare() must run before merge()"
        if direction is None:
            return base
        return base + layer_scale(key, self.depth, self.alpha, self.params.beta) * direction
