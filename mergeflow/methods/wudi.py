"""WUDI-merging (Cheng et al. 2025): per matrix, the merged τ that least interferes with each τt.

For every selected 2-D key, X starts at Σt τt and takes ``steps`` Adam steps (torch.optim.Adam, lr
``lr``, betas (0.9, 0.999), eps 1e-8, no weight decay) on

    L(X) = Σt ‖(X − τt) τtᵀ‖F² / ‖τt‖F²,   ∇L = 2 (X·G − C),  G = Σt τtᵀτt/‖τt‖F²,  C = Σt τt τtᵀτt/‖τt‖F²

(G and C formed once per key; tasks with τt = 0 add nothing). θ = θ0 + X, no scaling. Deterministic.

``scope: fusionbench`` (default, FusionBench 0.2.33 ``wudi``): every 2-D key not matching ``exclude``;
other keys get the mean τ. ``scope: official`` (the authors' ``vit/wudi_main.py``): only keys
containing ``attn.in_proj_weight``, ``attn.out_proj.weight``, ``mlp.c_fc.weight`` or
``mlp.c_proj.weight`` (open_clip names); every other key stays at θ0.
"""

from __future__ import annotations

import fnmatch
from typing import Literal

import torch
from pydantic import Field

from mergeflow.methods.averaging import task_vector_sum
from mergeflow.methods.registry import Merger, MethodParams, register

OFFICIAL_KEYS = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def wudi_solve(taus: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """X after ``steps`` Adam steps on L(X) from X0 = Σt τt (stacked T × m × n τt)."""
    norms = taus.flatten(1).pow(2).sum(dim=1)
    live = norms > 0
    weighted = taus[live] / norms[live].sqrt()[:, None, None]  # τt/‖τt‖: G = Σ wᵀw, C = Σ τt wᵀw
    gram = torch.zeros(taus.shape[-1], taus.shape[-1], dtype=taus.dtype, device=taus.device)
    target = torch.zeros_like(taus[0])
    for tau, w in zip(taus[live], weighted, strict=True):
        task_gram = w.mT @ w  # τtᵀτt/‖τt‖²
        gram += task_gram
        target += tau @ task_gram
    x = torch.nn.Parameter(taus.sum(dim=0))
    optimizer = torch.optim.Adam([x], lr=lr, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(steps):
        with torch.no_grad():
            x.grad = 2.0 * (x @ gram - target)
        optimizer.step()
    return x.detach()


class WudiParams(MethodParams):
    scope: Literal["fusionbench", "official"] = Field(
        "fusionbench",
        description="fusionbench: every 2-D key, mean τ elsewhere; official: 4 open_clip kinds, θ0 elsewhere",
    )
    steps: int = Field(400, ge=0, description="Adam steps per matrix (FusionBench config 400; official 300)")
    lr: float = Field(1e-5, gt=0.0, description="Adam learning rate")
    exclude: tuple[str, ...] = Field((), description="fusionbench scope: fnmatch globs of 2-D keys left to mean τ")


@register("wudi", WudiParams, "data-free: per matrix, Adam on Σt ‖(X − τt)τtᵀ‖²/‖τt‖² from X0 = Σt τt")
class Wudi(Merger):
    params: WudiParams

    def solves(self, key: str, base: torch.Tensor) -> bool:
        if base.ndim != 2:
            return False
        if self.params.scope == "official":
            return any(kind in key for kind in OFFICIAL_KEYS)
        return not any(fnmatch.fnmatchcase(key, pattern) for pattern in self.params.exclude)

    def merge(self, key: str, base: torch.Tensor, tuned: list[torch.Tensor]) -> torch.Tensor:
        if self.solves(key, base):
            return base + wudi_solve(torch.stack(tuned) - base, self.params.steps, self.params.lr)
        if self.params.scope == "official":
            return base.clone()
        return base + task_vector_sum(base, tuned) / len(tuned)
