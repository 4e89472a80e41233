"""The added baselines (MagMax, DARE, Breadcrumbs, LiNeS, SVC, WUDI, TSV-C, TALL masks, EMR): float64
references of their formulas (tests/reference_more.py) in float64, float32, bfloat16 and float16,
invariants, reproducibility, storage records, and refusal of meaningless parameters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import reference as ref
import reference_more as more
import torch
from helpers import LAYOUTS, load, max_rel_diff, random_state_dicts, write_set
from safetensors import safe_open

from mergeflow.engine import merge_checkpoints, open_checkpoint_set
from mergeflow.errors import ConfigError
from mergeflow.methods import get_method, parse_params

SINGLE = [
    ("magmax", {"scaling": 0.5}, lambda b, t: more.magmax(b, t, 0.5)),
    ("magmax", {"scaling": 1.3}, lambda b, t: more.magmax(b, t, 1.3)),
    ("breadcrumbs", {}, lambda b, t: more.breadcrumbs_official(b, t, 0.15, 0.006, 0.4)),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1, "scaling": 0.8},
     lambda b, t: more.breadcrumbs_official(b, t, 0.5, 0.1, 0.8)),
    ("breadcrumbs", {"variant": "mergekit", "density": 0.6, "gamma": 0.05, "scaling": 1.0},
     lambda b, t: more.breadcrumbs_mergekit(b, t, 0.6, 0.05, 1.0, ties=False)),
    ("breadcrumbs", {"variant": "mergekit", "density": 0.6, "gamma": 0.05, "sign_election": True, "scaling": 1.0},
     lambda b, t: more.breadcrumbs_mergekit(b, t, 0.6, 0.05, 1.0, ties=True)),
    ("lines", {"beta": 0.7}, lambda b, t: more.lines_ta(b, t, 0.7, 2)),
    ("lines", {"beta": 0.4, "depth": 5}, lambda b, t: more.lines_ta(b, t, 0.4, 5)),
    ("svc", {}, lambda b, t: more.svc(b, t, ref.task_arithmetic(b, t, 0.3), 0.1)),
    ("svc", {"base": "tsv", "base_params": {"scaling": 1.0}, "alpha": 1.0},
     lambda b, t: more.svc(b, t, ref.tsv(b, t, 1.0), 1.0)),
    ("wudi", {"steps": 25, "lr": 1e-3}, lambda b, t: more.wudi(b, t, 25, 1e-3)),
    ("pcb", {}, lambda b, t: more.pcb(b, t, "reference", 1e-4, 0.1, 1.0)),
    ("pcb", {"variant": "pairwise", "scaling": 0.9}, lambda b, t: more.pcb(b, t, "pairwise", 0.01, 0.05, 0.9)),
    ("pcb", {"variant": "normalized_sum", "ratio": 0.2}, lambda b, t: more.pcb(b, t, "normalized_sum", 0.01, 0.2, 1.0)),
]  # fmt: skip

PER_TASK = [
    ("tsv_c", {}, lambda b, t: more.tsv_c(b, t, 1 / len(t))),
    ("tsv_c", {"sv_reduction": 0.5}, lambda b, t: more.tsv_c(b, t, 0.5)),
    ("tall_masks", {"mask_lambda": 0.4}, lambda b, t: more.tall_masks(b, t, [0.4] * len(t))),
    ("tall_masks", {"mask_lambda": (0.2, 0.5, 0.9)}, lambda b, t: more.tall_masks(b, t, [0.2, 0.5, 0.9])),
    ("emr", {}, lambda b, t: more.emr(b, t)),
]

IDS = [f"{c[0]}-{i}" for i, c in enumerate(SINGLE)]
TASK_IDS = [f"{c[0]}-{i}" for i, c in enumerate(PER_TASK)]
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _merge(tmp: Path, method: str, params: dict, base: dict, tuned: list[dict], precision: str) -> list[dict]:
    base_path, paths = write_set(tmp / "in", base, tuned)
    per_task = get_method(method).per_task_outputs
    out = tmp / ("out" if per_task else "out.safetensors")
    result = merge_checkpoints(method, base_path, paths, out, params, device="cpu", precision=precision)
    return [load(p) for p in result.outputs]


def _canonical(tmp: Path, base: dict, tuned: list[dict]) -> list[dict]:
    """The fine-tunes in the engine's canonical (content) order, for references whose ties depend on it."""
    base_path, paths = write_set(tmp / "order", base, tuned)
    checkpoints = open_checkpoint_set(base_path, paths)
    try:
        return [tuned[i] for i in checkpoints.task_order]
    finally:
        checkpoints.close()


def _rounded(sd: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


@pytest.mark.parametrize("layout", ["open_clip", "hf_bert"])
@pytest.mark.parametrize(("method", "params", "reference"), SINGLE, ids=IDS)
def test_float64_matches_reference(tmp_path: Path, layout: str, method: str, params: dict, reference) -> None:
    base, tuned = random_state_dicts(LAYOUTS[layout](), tasks=3, seed=1, dtype=torch.float64)
    (got,) = _merge(tmp_path, method, params, base, tuned, "float64")
    assert max_rel_diff(got, reference(base, tuned)) <= 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("method", "params", "reference"), SINGLE, ids=IDS)
def test_narrow_dtypes_match_reference(
    tmp_path: Path, dtype: torch.dtype, method: str, params: dict, reference
) -> None:
    """Inputs in ``dtype``, float32 arithmetic, output in ``dtype``: equal to the float64 reference on the
    same (rounded) inputs to the rounding of ``dtype``."""
    base, tuned = random_state_dicts(LAYOUTS["open_clip"](), tasks=3, seed=2, dtype=dtype)
    (got,) = _merge(tmp_path, method, params, base, tuned, "float32")
    assert all(v.dtype == base[k].dtype for k, v in got.items())
    want = _rounded(reference(base, _canonical(tmp_path, base, tuned)), dtype)
    assert max_rel_diff(got, want) <= TOLERANCE[dtype]


@pytest.mark.parametrize(("method", "params", "reference"), PER_TASK, ids=TASK_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_per_task_methods_match_reference(tmp_path: Path, dtype, method: str, params: dict, reference) -> None:
    base, tuned = random_state_dicts(LAYOUTS["open_clip"](), tasks=3, seed=3, dtype=dtype)
    precision = "float64" if dtype == torch.float64 else "float32"
    got = _merge(tmp_path, method, params, base, tuned, precision)
    want = reference(base, tuned)
    assert len(got) == len(want) == 3
    for state, expected in zip(got, want, strict=True):
        assert max_rel_diff(state, _rounded(expected, dtype)) <= TOLERANCE[dtype]


def test_dare_without_drops_is_its_base_method_bit_for_bit(tmp_path: Path) -> None:
    base, tuned = random_state_dicts(LAYOUTS["open_clip"](), tasks=3, seed=4, dtype=torch.float32)
    (dare,) = _merge(tmp_path / "a", "dare", {"drop_rate": 0.0, "scaling": 0.7}, base, tuned, "float32")
    (ta,) = _merge(tmp_path / "b", "task_arithmetic", {"scaling": 0.7}, base, tuned, "float32")
    assert all(torch.equal(dare[k], ta[k]) for k in ta)
    ties_params = {"density": 0.3, "merge": "sum", "scaling": 0.5}
    (dare_ties,) = _merge(tmp_path / "c", "dare", {"drop_rate": 0.0, "combine": "ties", **ties_params}, base, tuned,
                          "float32")  # fmt: skip
    (ties,) = _merge(tmp_path / "d", "ties", ties_params, base, tuned, "float32")
    assert all(torch.equal(dare_ties[k], ties[k]) for k in ties)


def test_dare_is_seeded_reproducible_order_free_and_drops_its_share(tmp_path: Path) -> None:
    base, tuned = random_state_dicts(LAYOUTS["open_clip_wide"](), tasks=3, seed=5, dtype=torch.float64)
    params = {"drop_rate": 0.7, "scaling": 1.0}
    (first,) = _merge(tmp_path / "a", "dare", params, base, tuned, "float64")
    (again,) = _merge(tmp_path / "b", "dare", params, base, tuned, "float64")
    (reordered,) = _merge(tmp_path / "c", "dare", params, base, tuned[::-1], "float64")
    (other,) = _merge(tmp_path / "d", "dare", {**params, "seed": 1}, base, tuned, "float64")
    assert all(torch.equal(first[k], again[k]) and torch.equal(first[k], reordered[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    # one task: the kept entries are τ/(1 − p), the others exactly θ0; about 1 − p of them survive
    (single,) = _merge(tmp_path / "e", "dare", params, base, tuned[:1], "float64")
    kept = total = 0
    for key, theta0 in base.items():
        if not theta0.is_floating_point():
            continue
        tau = tuned[0][key] - theta0
        moved = single[key] != theta0
        torch.testing.assert_close(single[key][moved], (theta0 + tau / 0.3)[moved], rtol=1e-12, atol=1e-12)
        kept, total = kept + int(moved.sum()), total + moved.numel()
    assert abs(kept / total - 0.3) < 0.02
    meta = safe_open(str(tmp_path / "e" / "out.safetensors"), "pt").metadata()
    assert json.loads(meta["mergeflow.params"])["seed"] == 0


def test_dare_mean_over_seeds_approaches_task_arithmetic(tmp_path: Path) -> None:
    base, tuned = random_state_dicts(LAYOUTS["open_clip"](), tasks=2, seed=6, dtype=torch.float64)
    want = ref.task_arithmetic(base, tuned, 1.0)
    runs = [_merge(tmp_path / str(s), "dare", {"drop_rate": 0.5, "scaling": 1.0, "seed": s}, base, tuned,
                   "float64")[0] for s in range(24)]  # fmt: skip
    key = "model.visual.transformer.resblocks.0.mlp.c_fc.weight"
    mean = sum(r[key] for r in runs) / len(runs)
    error = (mean - want[key]).norm() / (want[key] - base[key]).norm()
    single = (runs[0][key] - want[key]).norm() / (want[key] - base[key]).norm()
    assert error < 0.35 * single  # ≈ 1/√24 of one run's deviation


def test_one_task_invariants(tmp_path: Path) -> None:
    """MagMax with α = 1, EMR and TSV-C at full rank give the single fine-tune back; LiNeS with β = 0 and
    α = λ is task arithmetic bit for bit."""
    base, tuned = random_state_dicts(LAYOUTS["open_clip"](), tasks=1, seed=7, dtype=torch.float64)
    one = tuned[0]
    (magmax,) = _merge(tmp_path / "m", "magmax", {"scaling": 1.0}, base, tuned, "float64")
    (emr,) = _merge(tmp_path / "e", "emr", {}, base, tuned, "float64")
    (tsv_c,) = _merge(tmp_path / "t", "tsv_c", {"sv_reduction": 1.0}, base, tuned, "float64")
    for got in (magmax, emr, tsv_c):
        assert max_rel_diff(got, one) <= 1e-12
    base3, tuned3 = random_state_dicts(LAYOUTS["open_clip"](), tasks=3, seed=8, dtype=torch.float32)
    (lines,) = _merge(tmp_path / "l", "lines", {"beta": 0.0, "alpha": 0.35}, base3, tuned3, "float32")
    (ta,) = _merge(tmp_path / "a", "task_arithmetic", {"scaling": 0.35}, base3, tuned3, "float32")
    assert all(torch.equal(lines[k], ta[k]) for k in ta)


def test_lines_over_ties_uses_the_l1_ratio_and_depth(tmp_path: Path) -> None:
    base, tuned = random_state_dicts(LAYOUTS["open_clip"](), tasks=3, seed=9, dtype=torch.float64)
    (ties,) = _merge(tmp_path / "t", "ties", {"density": 0.2, "merge": "mean", "scaling": 1.0}, base, tuned, "float64")
    floats = [k for k, v in base.items() if v.is_floating_point()]
    merged_l1 = sum(float((ties[k] - base[k]).abs().sum()) for k in floats)
    total_l1 = sum(float(sum(t[k] - base[k] for t in tuned).abs().sum()) for k in floats)
    alpha = total_l1 / merged_l1 / 3
    (lines,) = _merge(tmp_path / "l", "lines", {"base": "ties", "beta": 0.6}, base, tuned, "float64")
    for key in floats:
        layer = 0 if ".resblocks.0." in key else 1 if ".resblocks.1." in key else None
        scale = alpha + (0.6 * layer if layer is not None else 0.0)  # L = 2: β·ℓ/(L − 1)
        torch.testing.assert_close(lines[key], base[key] + scale * (ties[key] - base[key]), rtol=1e-10, atol=1e-12)


def test_per_task_outputs_record_their_storage(tmp_path: Path) -> None:
    base, tuned = random_state_dicts(LAYOUTS["open_clip"](), tasks=3, seed=10, dtype=torch.float32)
    base_path, paths = write_set(tmp_path / "in", base, tuned)
    floats = {k: v for k, v in base.items() if v.is_floating_point()}
    model_bytes = sum(v.numel() * 4 for v in floats.values())
    mask_bytes = sum((v.numel() + 7) // 8 for v in floats.values())
    triplets = sum(
        min(int(min(v.shape) / 3) * (sum(v.shape) + 1), v.numel()) * 4 if v.ndim == 2 else v.numel() * 4
        for v in floats.values()
    )
    expected = {"tsv_c": (0, triplets), "tall_masks": (model_bytes, mask_bytes), "emr": (model_bytes, mask_bytes + 4)}
    for method, (shared, per_task) in expected.items():
        result = merge_checkpoints(method, base_path, paths, tmp_path / method, {}, device="cpu")
        for path in result.outputs:
            record = json.loads(safe_open(str(path), "pt").metadata()["mergeflow.storage"])
            assert record == {"shared_bytes": shared, "per_task_bytes": per_task, "tasks": 3,
                              "total_bytes": shared + 3 * per_task}, method  # fmt: skip
    result = merge_checkpoints("cart_indexing", base_path, paths, tmp_path / "ci", {"rank_ratio": 0.25}, device="cpu")
    record = json.loads(safe_open(str(result.outputs[0]), "pt").metadata()["mergeflow.storage"])
    assert record["shared_bytes"] == model_bytes and 0 < record["per_task_bytes"] < model_bytes
    single = merge_checkpoints("magmax", base_path, paths, tmp_path / "mm.safetensors", {}, device="cpu")
    assert "mergeflow.storage" not in safe_open(str(single.outputs[0]), "pt").metadata()


@pytest.mark.parametrize(
    ("method", "params", "says"),
    [
        ("dare", {"drop_rate": 1.0}, "drop_rate"),
        ("dare", {"drop_rate": -0.1}, "drop_rate"),
        ("breadcrumbs", {"density": 0.0}, "density"),
        ("breadcrumbs", {"gamma": 1.0}, "gamma"),
        ("svc", {"base": "nope"}, "unknown merge method"),
        ("svc", {"base": "svc"}, "single merged model"),
        ("svc", {"base": "emr"}, "single merged model"),
        ("svc", {"base_params": {"scaling": float("nan")}}, "finite"),
        ("lines", {"depth": 0}, "depth"),
        ("wudi", {"lr": 0.0}, "lr"),
        ("tsv_c", {"sv_reduction": 0.0}, "sv_reduction"),
        ("tall_masks", {"mask_lambda": -1.0}, "non-negative"),
        ("magmax", {"scaling": float("inf")}, "finite"),
    ],
)
def test_meaningless_parameters_are_refused(method: str, params: dict, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        parse_params(method, params)


def test_tall_masks_needs_one_lambda_per_task(tmp_path: Path) -> None:
    base, tuned = random_state_dicts(LAYOUTS["open_clip"](), tasks=3, seed=11, dtype=torch.float32)
    with pytest.raises(ConfigError, match="3 tasks"):
        _merge(tmp_path, "tall_masks", {"mask_lambda": (0.2, 0.4)}, base, tuned, "float32")
