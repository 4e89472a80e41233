"""CART's task-vector analyses over a set of checkpoints, streamed one matrix key at a time:
spectra, energy in the top k, row-space interference and reconstruction error, each for centred
(θt − θ_avg) and uncentred (θt − θ0) vectors, aggregated per layer type; plots and a JSON record.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mergeflow.analysis.spectra import (
    LAYER_TYPES,
    energy_share,
    interference,
    layer_type,
    reconstruction_error,
    right_singular_vectors,
    singular_values,
    task_vectors,
)
from mergeflow.engine import load_checked, open_checkpoint_set
from mergeflow.writer import write_text_atomic

log = logging.getLogger("mergeflow.analysis")

RATIOS = (0.01, 0.02, 0.04, 0.08, 0.12, 0.16, 0.24, 0.32, 0.5, 0.75, 1.0)
SPECTRUM_POINTS = 50  # singular values resampled on a common grid of i / min(m, n)


def _resample(values: torch.Tensor, points: int = SPECTRUM_POINTS) -> torch.Tensor:
    """s_i / s_1 at evenly spaced positions i / n (so that matrices of different sizes average)."""
    n = values.shape[-1]
    index = torch.linspace(0, n - 1, points).round().long()
    return values[..., index] / values[..., :1].clamp_min(1e-300)


def analyze_task_vectors(
    pretrained: str | Path, finetuned: Sequence[str | Path], ratios: Sequence[float] = RATIOS
) -> dict[str, Any]:
    """Per layer type and for centred/uncentred vectors: mean normalised spectrum, energy share,
    interference and relative reconstruction error at each rank ratio (k = max(1, ⌊ratio·min(m,n)⌋))."""
    start = time.perf_counter()
    sums: dict[tuple[str, str, str], torch.Tensor] = {}
    counts: dict[str, int] = defaultdict(int)
    checkpoints = open_checkpoint_set(pretrained, finetuned)
    try:
        keys = sorted(k for k in checkpoints.layout if layer_type(k) and len(checkpoints.layout[k].shape) == 2)
        for key in keys:
            kind = layer_type(key)
            assert kind is not None
            base = load_checked(checkpoints.pretrained, key)
            tuned = [load_checked(r, key) for r in checkpoints.canonical]
            ks = [max(1, int(r * min(base.shape))) for r in ratios]
            for centred in (True, False):
                label = "centred" if centred else "uncentred"
                vectors = task_vectors(base, tuned, centred)
                values = singular_values(vectors)
                rows = right_singular_vectors(vectors, max(ks))
                measures = {
                    "spectrum": _resample(values).mean(0),
                    "energy": energy_share(values, ks).mean(0),
                    "interference": interference(rows, ks),
                    "reconstruction": reconstruction_error(values, ks),
                }
                for name, value in measures.items():
                    slot = (kind, label, name)
                    sums[slot] = sums.get(slot, torch.zeros_like(value)) + value
            counts[kind] += 1
    finally:
        checkpoints.close()
    result: dict[str, Any] = {"ratios": list(ratios), "tasks": len(finetuned), "layer_types": {}}
    for kind in LAYER_TYPES:
        if counts[kind]:
            result["layer_types"][kind] = {
                "matrices": counts[kind],
                **{
                    label: {name: (sums[(kind, label, name)] / counts[kind]).tolist()
                            for name in ("spectrum", "energy", "interference", "reconstruction")}
                    for label in ("centred", "uncentred")
                },
            }  # fmt: skip
    log.info("task-vector analysis of %d matrices in %.1f s", sum(counts.values()), time.perf_counter() - start)
    return result


def plot_task_vectors(result: dict[str, Any], out_dir: str | Path, title: str) -> list[Path]:
    """Four figures: spectra, energy share, interference, reconstruction error (centred vs uncentred)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kinds = list(result["layer_types"])
    ratios = result["ratios"]
    written = []
    panels = {
        "spectrum": ("normalised singular value s_i / s_1", "position i / min(m, n)", "spectra"),
        "energy": ("share of energy in the top k", "rank ratio k / min(m, n)", "energy_share"),
        "interference": ("row-space interference I(k)", "rank ratio k / min(m, n)", "interference"),
        "reconstruction": ("relative reconstruction error R(k)", "rank ratio k / min(m, n)", "reconstruction_error"),
    }
    for measure, (ylabel, xlabel, stem) in panels.items():
        fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds), 3.0), sharey=True, squeeze=False)
        for ax, kind in zip(axes[0], kinds, strict=True):
            for label, style in (("centred", "-"), ("uncentred", "--")):
                ys = result["layer_types"][kind][label][measure]
                xs = [i / (len(ys) - 1) for i in range(len(ys))] if measure == "spectrum" else ratios
                ax.plot(xs, ys, style, marker="." if measure != "spectrum" else None, label=label)
            ax.set_title(f"{kind} ({result['layer_types'][kind]['matrices']} matrices)", fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            if measure != "spectrum":
                ax.set_xscale("log")
            if measure == "spectrum":
                ax.set_yscale("log")
        axes[0][0].set_ylabel(ylabel, fontsize=8)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{title}: {stem.replace('_', ' ')}, mean over matrices of each type", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_task_vector_report(result: dict[str, Any], out_dir: str | Path, title: str) -> list[Path]:
    out_dir = Path(out_dir)
    write_text_atomic(out_dir / "task_vectors.json", json.dumps(result, indent=1))
    return [out_dir / "task_vectors.json", *plot_task_vectors(result, out_dir, title)]
