"""How much of each task vector a merge keeps, measured in weight space (streamed key by key).

For the merged task vector Δ = θ_merged − θ0 and each τt = θt − θ0, over every float tensor:
cos_t = ⟨Δ, τt⟩ / (‖Δ‖·‖τt‖), and the norm ratio ‖Δ‖ / ‖(1/T)·Σt τt‖. A proxy that needs no data;
accuracy on real tasks is what the evaluation issues measure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from mergeflow.checkpoint import open_checkpoint


def task_vector_alignment(pretrained: Path, finetuned: Sequence[Path], merged: Path) -> dict[str, object]:
    """Per-task cosine between the merged task vector and each τt, plus ‖Δ‖ / ‖mean τ‖."""
    readers = [open_checkpoint(p) for p in (pretrained, merged, *finetuned)]
    try:
        base_r, merged_r, tuned_r = readers[0], readers[1], readers[2:]
        dots = torch.zeros(len(tuned_r), dtype=torch.float64)
        tau_sq = torch.zeros(len(tuned_r), dtype=torch.float64)
        delta_sq = mean_sq = 0.0
        for key in base_r.keys():
            if not base_r.meta(key).is_float:
                continue
            base = base_r.load(key).double()
            delta = merged_r.load(key).double() - base
            taus = [r.load(key).double() - base for r in tuned_r]
            delta_sq += float(delta.pow(2).sum())
            mean_sq += float((sum(taus) / len(taus)).pow(2).sum())
            for t, tau in enumerate(taus):
                dots[t] += (delta * tau).sum()
                tau_sq[t] += tau.pow(2).sum()
        norms = (tau_sq.sqrt() * delta_sq**0.5).clamp(min=1e-300)
        return {"cosine": (dots / norms).tolist(), "norm_ratio": (delta_sq / max(mean_sq, 1e-300)) ** 0.5}
    finally:
        for reader in readers:
            reader.close()
