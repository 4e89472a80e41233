"""mergekit's generalized task arithmetic (mergekit 0.1.5 ``generalized_task_arithmetic.py``), as rules.

One tensor at a time, tasks stacked on dimension 0, ``w`` one weight per task:

- sparsify ``magnitude`` (TIES): keep the k = max(1, ⌊density·n⌋) entries of largest |τ| of the
  tensor (density ≥ 1 keeps all); |τ| is compared in float32 at most (mergekit sorts float32 on the
  CPU), equal values in stable order. ``random`` (DARE): keep each entry with probability density;
  with ``rescale`` the kept entries are scaled to τ's L1 norm (not by 1/density).
- weighted deltas δt = wt·τ̃t.
- consensus ``sum``: γ = +1 where Σt δt ≥ 0, else −1; mask_t = (sign δt = γ); mixed = Σt δt·mask_t,
  and with ``normalize`` mixed / Σt wt·mask_t (a divisor of 0 counts as 1).
- without consensus: mixed = Σt δt, and with ``normalize`` mixed / Σt wt (1 where |Σt wt| < 1e-8);
  that division is a constant, so the recipe reader folds it into the weights (wt / Σs ws).
- θ = θ0 + λ·mixed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def magnitude_keep(tau: torch.Tensor, density: float) -> torch.Tensor:
    """τ with all but its k = max(1, ⌊density·n⌋) largest |τ| set to 0 (all kept when density ≥ 1)."""
    if density >= 1.0 or tau.numel() == 0:
        return tau
    flat = tau.reshape(-1)
    k = max(1, int(density * flat.numel()))
    magnitude = flat.abs()
    if magnitude.dtype == torch.float64:
        magnitude = magnitude.to(torch.float32)
    order = torch.argsort(magnitude, descending=True, stable=True)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order[:k]] = True
    return (flat * keep).reshape(tau.shape)


def l1_rescaled(tau: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """masked · (‖τ‖₁ / ‖masked‖₁), masked itself where either norm is below 1e-7 (mergekit's ``rescale``)."""
    before, after = float(tau.abs().sum()), float(masked.abs().sum())
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def consensus_mix(deltas: torch.Tensor, weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """mixed of the stacked (sparsified) τt with weights wt under consensus ``sum`` (see the module)."""
    w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device).reshape((-1,) + (1,) * (deltas.ndim - 1))
    weighted = deltas * w
    majority = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    mask = torch.sign(weighted) == majority
    mixed = (weighted * mask).sum(dim=0)
    if not normalize:
        return mixed
    divisor = (w * mask).sum(dim=0)
    return mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


def weighted_sum(deltas: Sequence[torch.Tensor], weights: Sequence[float] | None) -> torch.Tensor:
    """Σt wt·τt in task order (Σt τt when ``weights`` is None, bit for bit the plain sum)."""
    if weights is None:
        total = deltas[0].clone()
        for delta in deltas[1:]:
            total += delta
        return total
    total = deltas[0] * weights[0]
    for delta, weight in zip(deltas[1:], weights[1:], strict=True):
        total += delta * weight
    return total
