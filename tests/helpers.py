"""Shared helpers for tests: small random checkpoints in both layouts, comparisons."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from mergeflow.checkpoint import TensorMeta, read_state_dict
from mergeflow.synthetic import bert_layout, open_clip_visual_layout

LAYOUTS = {
    "open_clip": lambda: open_clip_visual_layout(
        width=24, layers=2, patch=4, image=8, output_dim=16, prefix="model.visual."
    ),
    "hf_bert": lambda: bert_layout(hidden=16, layers=2, intermediate=40, vocab=30, positions=8),
    # big enough for the Gram solver path to trigger (k + oversampling < min(m, n))
    "open_clip_wide": lambda: open_clip_visual_layout(width=48, layers=1, patch=4, image=8, output_dim=40),
}


def random_state_dicts(
    layout: dict[str, TensorMeta], tasks: int, seed: int = 0, dtype: torch.dtype = torch.float64, scale: float = 0.1
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    for key, meta in layout.items():
        if meta.is_float:
            base[key] = torch.randn(meta.shape, generator=g, dtype=torch.float64).to(dtype)
        else:
            base[key] = torch.arange(meta.numel, dtype=meta.dtype).reshape(meta.shape)
    tuned = []
    for _ in range(tasks):
        sd = {}
        for key, tensor in base.items():
            if tensor.is_floating_point():
                sd[key] = (tensor.double() + scale * torch.randn(tensor.shape, generator=g, dtype=torch.float64)).to(
                    dtype
                )
            else:
                sd[key] = tensor.clone()
        tuned.append(sd)
    return base, tuned


def write_set(directory: Path, base: dict, tuned: list[dict]) -> tuple[Path, list[Path]]:
    """Write with the safetensors library itself (independent of mergeflow's writer)."""
    directory.mkdir(parents=True, exist_ok=True)
    base_path = directory / "base.safetensors"
    save_file(base, str(base_path))
    paths = []
    for i, sd in enumerate(tuned):
        path = directory / f"ft{i}.safetensors"
        save_file(sd, str(path))
        paths.append(path)
    return base_path, paths


def max_rel_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """Largest per-tensor relative Frobenius difference; key sets and shapes must match exactly."""
    assert set(got) == set(want)
    worst = 0.0
    for key, w in want.items():
        g = got[key]
        assert g.shape == w.shape, key
        if not w.is_floating_point():
            assert torch.equal(g, w), key
            continue
        diff = (g.double() - w.double()).norm().item()
        worst = max(worst, diff / max(w.double().norm().item(), 1e-30))
    return worst


def load(path: Path) -> dict[str, torch.Tensor]:
    return read_state_dict(path)


def prefect_harness():
    """Prefect's test harness (a temporary database and API server) with a start-up timeout a loaded
    2-core CI machine meets (Prefect's default is 30 s)."""
    from prefect.testing.utilities import prefect_test_harness

    return prefect_test_harness(server_startup_timeout=240)
