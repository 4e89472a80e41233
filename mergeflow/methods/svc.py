"""Singular Value Calibration (FusionBench 0.2.33 ``singular_value_calibration``, arXiv 2602.05536).

Post-processes the merge θm of a ``base`` method. For every 2-D float key, with D = θm − θ0 =
U diag(S) Vh (thin SVD, float64 as FusionBench's default implementation) and each task's τk:

    a_rk = u_rᵀ τk,   s_rk = ⟨u_rᵀ D, a_rk⟩ / max(‖a_rk‖², 1e-12)   (NaN and −∞ become α),
    γ_r = T / Σk max(α, s_rk),   θ = θ0 + U diag(γ ⊙ S) Vh.

Every other key keeps θm. The base method's own scaling is part of ``base_params``; SVC has none.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, model_validator

from mergeflow.linalg import svd
from mergeflow.methods.registry import (
    MergeContext,
    Merger,
    MethodParams,
    TensorSource,
    get_method,
    params_record,
    parse_params,
    register,
)


def calibrate(delta: torch.Tensor, taus: torch.Tensor, alpha: float) -> torch.Tensor:
    """U diag(γ ⊙ S) Vh for D = ``delta`` and stacked τk, in float64, returned in D's dtype."""
    d = delta.to(torch.float64)
    u, s, vh = svd(d)
    projected = torch.einsum("mr,tmn->trn", u, taus.to(torch.float64))  # a_rk = u_rᵀ τk, as (k, r, n)
    along = s[:, None] * vh  # u_rᵀ D = s_r · vh_r
    ratio = (projected * along).sum(dim=-1) / (projected * projected).sum(dim=-1).clamp(min=1e-12)
    ratio = torch.where(torch.isnan(ratio) | (ratio == float("-inf")), torch.full_like(ratio, alpha), ratio)
    gamma = taus.shape[0] / ratio.clamp(min=alpha).sum(dim=0)
    return ((u * (gamma * s)) @ vh).to(delta.dtype)


class SvcParams(MethodParams):
    base: str = Field("task_arithmetic", description="method whose merge is calibrated (one output, not svc)")
    base_params: dict[str, Any] = Field(
        default_factory=lambda: {"scaling": 0.3}, description="the base method's parameters"
    )
    alpha: float = Field(0.1, description="α: lower bound of each task's calibration ratio s_rk")

    @model_validator(mode="after")
    def _base_is_a_method(self) -> SvcParams:
        spec = get_method(self.base)
        if self.base == "svc" or spec.per_task_outputs:
            raise ValueError(f"svc calibrates a single merged model; base {self.base!r} cannot be used")
        parsed = parse_params(self.base, self.base_params)
        object.__setattr__(self, "base_params", params_record(parsed))
        return self


@register("svc", SvcParams, "singular-value calibration of another method's merged τ on 2-D keys")
class Svc(Merger):
    params: SvcParams

    def __init__(self, params: SvcParams, ctx: MergeContext):
        super().__init__(params, ctx)
        self.inner = get_method(params.base).merger(parse_params(params.base, params.base_params), ctx)

    def prepare(self, source: TensorSource) -> None:
        self.inner.prepare(source)

    def merge(self, key: str, base: torch.Tensor, tuned: list[torch.Tensor]) -> torch.Tensor:
        merged = self.inner.merge(key, base, tuned)
        assert isinstance(merged, torch.Tensor)
        if base.ndim != 2:
            return merged
        return base + calibrate(merged - base, torch.stack(tuned) - base, self.params.alpha)
