"""Every method against its float64 reference (tests/reference.py), in both layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import reference as ref
import torch
from helpers import LAYOUTS, load, max_rel_diff, random_state_dicts, write_set
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergeflow.engine import merge_checkpoints
from mergeflow.synthetic import open_clip_visual_layout

CASES = [
    ("weight_average", {}, lambda b, t: ref.weight_average(b, t)),
    ("task_arithmetic", {"scaling": 0.7}, lambda b, t: ref.task_arithmetic(b, t, 0.7)),
    ("ties", {"density": 0.2}, lambda b, t: ref.ties(b, t, 0.2, "mean", "global", 1.0)),
    (
        "ties",
        {"density": 0.35, "merge": "sum", "scaling": 0.6},
        lambda b, t: ref.ties(b, t, 0.35, "sum", "global", 0.6),
    ),
    (
        "ties",
        {"density": 0.5, "merge": "max", "scope": "tensor"},
        lambda b, t: ref.ties(b, t, 0.5, "max", "tensor", 1.0),
    ),
    ("ties", {"density": 1.0, "merge": "mean"}, lambda b, t: ref.ties(b, t, 1.0, "mean", "global", 1.0)),
    ("consensus", {"mask_lambda": 0.4, "min_tasks": 2}, lambda b, t: ref.consensus(b, t, [0.4] * len(t), 2, 1.0)),
    (
        "consensus",
        {"mask_lambda": (0.2, 0.5, 0.9), "min_tasks": 1, "scaling": 0.8},
        lambda b, t: ref.consensus(b, t, [0.2, 0.5, 0.9], 1, 0.8),
    ),
    ("cart", {}, lambda b, t: ref.cart(b, t, 2.0, 0.12)),
    ("cart", {"scaling": 1.5, "rank_ratio": 0.3}, lambda b, t: ref.cart(b, t, 1.5, 0.3)),
    ("cart", {"rank_ratio": 0.3, "svd_solver": "full"}, lambda b, t: ref.cart(b, t, 2.0, 0.3)),
    ("tsv", {}, lambda b, t: ref.tsv(b, t, 1.0)),
    ("tsv", {"scaling": 0.5, "svd_solver": "full"}, lambda b, t: ref.tsv(b, t, 0.5)),
    ("iso_c", {}, lambda b, t: ref.iso_c(b, t, 1.5)),
    ("iso_cts", {}, lambda b, t: ref.iso_cts(b, t, 1.5, 0.8)),
    ("iso_cts", {"common_fraction": 0.5, "scaling": 1.0}, lambda b, t: ref.iso_cts(b, t, 1.0, 0.5)),
]


def _run(tmp: Path, method: str, params: dict, base: dict, tuned: list[dict], precision: str) -> dict:
    base_path, paths = write_set(tmp / "in", base, tuned)
    out = tmp / "out.safetensors"
    merge_checkpoints(method, base_path, paths, out, params, device="cpu", precision=precision)
    return load(out)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize(("method", "params", "reference"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_float64_matches_reference(tmp_path: Path, layout: str, method: str, params: dict, reference) -> None:
    base, tuned = random_state_dicts(LAYOUTS[layout](), tasks=3, seed=1, dtype=torch.float64)
    got = _run(tmp_path, method, params, base, tuned, "float64")
    assert max_rel_diff(got, reference(base, tuned)) <= 1e-9


@pytest.mark.parametrize(("method", "params", "reference"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_float32_matches_reference(tmp_path: Path, method: str, params: dict, reference) -> None:
    base, tuned = random_state_dicts(LAYOUTS["open_clip_wide"](), tasks=3, seed=2, dtype=torch.float32)
    got = _run(tmp_path, method, params, base, tuned, "float32")
    assert all(v.dtype == base[k].dtype for k, v in got.items())
    assert max_rel_diff(got, reference(base, tuned)) <= 1e-4


def test_cart_indexing_per_task_in_user_order(tmp_path: Path) -> None:
    base, tuned = random_state_dicts(LAYOUTS["open_clip"](), tasks=3, seed=3)
    base_path, paths = write_set(tmp_path / "in", base, tuned)
    result = merge_checkpoints(
        "cart_indexing", base_path, paths, tmp_path / "idx", {"rank_ratio": 0.25}, precision="float64"
    )
    want = ref.cart(base, tuned, 2.0, 0.25, per_task=True)
    assert [p.name for p in result.outputs] == ["00-ft0.safetensors", "01-ft1.safetensors", "02-ft2.safetensors"]
    for path, expected in zip(result.outputs, want, strict=True):
        assert max_rel_diff(load(path), expected) <= 1e-9


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    width=st.integers(2, 10),
    mlp_ratio=st.sampled_from([1.0, 2.0, 4.0]),
    tasks=st.integers(1, 5),
    method=st.sampled_from(["cart", "tsv", "iso_c", "iso_cts", "ties", "consensus"]),
    ratio=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    seed=st.integers(0, 10_000),
)
def test_random_shapes_and_task_counts(tmp_path_factory, width, mlp_ratio, tasks, method, ratio, seed) -> None:
    layout = open_clip_visual_layout(width=width, layers=1, patch=2, image=4, output_dim=3, mlp_ratio=mlp_ratio)
    base, tuned = random_state_dicts(layout, tasks=tasks, seed=seed)
    params, reference = {
        "cart": ({"rank_ratio": ratio}, lambda: ref.cart(base, tuned, 2.0, ratio)),
        "tsv": ({}, lambda: ref.tsv(base, tuned, 1.0)),
        "iso_c": ({}, lambda: ref.iso_c(base, tuned, 1.5)),
        "iso_cts": ({"common_fraction": max(ratio, 0.1)}, lambda: ref.iso_cts(base, tuned, 1.5, max(ratio, 0.1))),
        "ties": ({"density": max(ratio, 0.05)}, lambda: ref.ties(base, tuned, max(ratio, 0.05), "mean", "global", 1.0)),
        "consensus": ({"min_tasks": 1}, lambda: ref.consensus(base, tuned, [0.4] * tasks, 1, 1.0)),
    }[method]
    got = _run(tmp_path_factory.mktemp("h"), method, params, base, tuned, "float64")
    assert max_rel_diff(got, reference()) <= 1e-9
