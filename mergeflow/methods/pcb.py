"""PCB-merging (Du et al. 2024, "Parameter Competition Balancing"), as the official code computes it.

Each task's τt over every float key is one row of d entries; statistics are over that row. With
order statistics q(x, i) = sort(x)[i], clamp(x, a, b) = x clipped to [q(x, ⌊d·a⌋), q(x, ⌊d·(1−b) − 1⌋)]
and minmax(x) = (x − min x)/(max x − min x):

    A_t = clamp(|τt|, c, c),  C_t = sign(τt)·A_t,  intra_t = exp(T·minmax(A_t)²),
    P_t = intra_t ⊙ inter_t,  s_t = minmax(clamp(P_t, 1 − r, 0)),
    θ = θ0 + λ·Σt C_t ⊙ s_t / max(Σt s_t, 1e-12)

(entries with P_t ≤ q(P_t, ⌊d(1 − r)⌋) get s_t = 0). The three official variants differ in c, r and
the inter-task term:

- ``reference`` (``pcb-merging.py::PCB_merge``; c = 1e-4, r = 0.1): inter_t = tanh(τt ⊙ Σs τs).
- ``pairwise`` (``vision_source_code/pcb_ES.py``; c = 0.01, r = 0.05): N_t = sign(τt)·minmax(A_t),
  inter_t = Σj tanh(N_t ⊙ N_j) (j = t included). The official code then searches per-task λt on
  validation (nevergrad); here λ is one ``scaling`` (a grid searches it).
- ``normalized_sum`` (``vision_source_code/pcb.py``; c = 0.01, r = 0.05): inter_t = tanh(τt ⊙ Σj N_j);
  the official λ is float32(1.2) = 1.2000000476837158 for its 8 tasks.

Memory stays at one model: the order statistics of each task's row are taken one task at a time
(one pass for A's bounds, one pass per task for P's), as TIES takes its global thresholds.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mergeflow.methods.registry import Affine, Merger, MethodParams, TensorSource, register

VARIANTS = {"reference": (1e-4, 0.1), "pairwise": (0.01, 0.05), "normalized_sum": (0.01, 0.05)}


def order_statistics(buffer: torch.Tensor, positions: list[int]) -> list[float]:
    """sort(buffer)[i] for each i (introselect in place on the CPU; callers own the buffer)."""
    flat = buffer.reshape(-1)
    if flat.device.type == "cpu":
        array = flat.contiguous().numpy()
        array.partition(sorted(set(positions)))
        return [float(array[i]) for i in positions]
    ordered = flat.sort().values
    return [float(ordered[i]) for i in positions]


def minmax(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """(x − low)/(high − low) for x already clipped to [low, high]."""
    return (x - low) / (high - low)


class PcbParams(MethodParams):
    variant: Literal["reference", "pairwise", "normalized_sum"] = Field(
        "reference", description="which official PCB formula (c, r and the inter-task balancing term)"
    )
    ratio: float | None = Field(None, gt=0.0, lt=1.0, description="r: share of entries kept per task; null: variant's")
    clamp: float | None = Field(None, ge=0.0, lt=0.5, description="c: share clipped at each end; null: variant default")
    scaling: float = Field(1.0, description="λ in θ0 + λ·Σt C_t s_t / Σt s_t")


@register("pcb", PcbParams, "parameter competition balancing: intra/inter-task scores, drop, rescale")
class Pcb(Merger):
    params: PcbParams

    def constants(self) -> tuple[float, float]:
        """(c, r) of the run."""
        c, r = VARIANTS[self.params.variant]
        return (self.params.clamp if self.params.clamp is not None else c,
                self.params.ratio if self.params.ratio is not None else r)  # fmt: skip

    def prepare(self, source: TensorSource) -> None:
        keys = self.ctx.float_keys
        d = sum(self.ctx.layout[k].numel for k in keys)
        c, r = self.constants()
        self.a_bounds: list[tuple[float, float]] = []
        for task in range(self.ctx.num_tasks):
            buffer = torch.empty(d, dtype=self.ctx.dtype, device=self.ctx.device)
            offset = 0
            for _, base, theta in source.iter_task(keys, task):
                n = base.numel()
                torch.sub(theta, base, out=buffer[offset : offset + n].view(base.shape)).abs_()
                offset += n
            low, high = order_statistics(buffer, [int(d * c), int(d * (1 - c) - 1)])
            self.a_bounds.append((low, high))
            del buffer
        self.p_bounds: list[tuple[float, float]] = []
        for task in range(self.ctx.num_tasks):
            buffer = torch.empty(d, dtype=self.ctx.dtype, device=self.ctx.device)
            offset = 0
            for _, base, tuned in source.iter_all(keys):
                n = base.numel()
                buffer[offset : offset + n] = self.competition(torch.stack(tuned) - base)[task].reshape(-1)
                offset += n
            low, high = order_statistics(buffer, [int(d * (1 - r)), d - 1])
            self.p_bounds.append((low, high))
            del buffer

    def clipped(self, taus: torch.Tensor) -> torch.Tensor:
        """A_t = |τt| clipped to task t's bounds, stacked."""
        return torch.stack([t.abs().clamp(lo, hi) for t, (lo, hi) in zip(taus, self.a_bounds, strict=True)])

    def competition(self, taus: torch.Tensor) -> torch.Tensor:
        """P_t = intra_t ⊙ inter_t for one key, stacked over tasks."""
        num_tasks = taus.shape[0]
        magnitude = self.clipped(taus)
        normed = torch.stack([minmax(a, lo, hi) for a, (lo, hi) in zip(magnitude, self.a_bounds, strict=True)])
        intra = torch.exp(num_tasks * normed.pow(2))
        if self.params.variant == "reference":
            inter = torch.tanh(taus * taus.sum(dim=0))
        else:
            signed = torch.sign(taus) * normed
            if self.params.variant == "pairwise":
                inter = torch.stack([torch.tanh(n_t * signed).sum(dim=0) for n_t in signed])
            else:
                inter = torch.tanh(taus * signed.sum(dim=0))
        return intra * inter

    def affine(self, key: str, base: torch.Tensor, tuned: list[torch.Tensor]) -> Affine:
        """A = θ0, D = Σt C_t ⊙ s_t / max(Σt s_t, 1e-12)."""
        taus = torch.stack(tuned) - base
        signed = torch.sign(taus) * self.clipped(taus)
        scores = self.competition(taus)
        kept = torch.stack([minmax(p.clamp(lo, hi), lo, hi) for p, (lo, hi) in zip(scores, self.p_bounds, strict=True)])
        return base, (signed * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=1e-12)
