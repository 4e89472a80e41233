"""Every added baseline against its reference implementation's own output (tests/parity/: FusionBench
0.2.33, mergekit 0.1.5 and the official code of Breadcrumbs, WUDI, TSV, TALL masks, LiNeS and PCB, run
by tests/parity/generate.py on one fixed set of θ0 + 3 fine-tunes with planted zeros and ties)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import load, max_rel_diff

from mergeflow.engine import merge_checkpoints
from mergeflow.methods import get_method

PARITY = Path(__file__).parent / "parity"
CASES = {case["name"]: case for case in json.loads((PARITY / "cases.json").read_text())}

# mergeflow's parameters for each case (the reference's own are in cases.json), and the tolerance:
# float64 references agree to round-off; float32 ones to float32 round-off.
MERGEKIT = {"variant": "mergekit", "density": 0.8, "gamma": 0.05, "scaling": 1.0}
OURS: dict[str, dict] = {
    "magmax_s0.5": {"scaling": 0.5},
    "magmax_s1.0": {"scaling": 1.0},
    "magmax_s0.5_f32": {"scaling": 0.5},
    "magmax_s1.0_f32": {"scaling": 1.0},
    "emr": {},
    "emr_f32": {},
    "svc_ta_l0.3_a0.1": {"base": "task_arithmetic", "base_params": {"scaling": 0.3}, "alpha": 0.1},
    "svc_tsvm_a1.0": {"base": "tsv", "base_params": {"scaling": 1.0}, "alpha": 1.0},
    "wudi_fb_iter30": {"steps": 30},
    "wudi_official_iter30": {"steps": 30, "scope": "official"},
    "breadcrumbs_mergekit_d0.8_g0.05": MERGEKIT,
    "breadcrumbs_ties_mergekit_d0.8_g0.05": {**MERGEKIT, "sign_election": True},
    "breadcrumbs_official_a1.0_b0.8_g0.05": {"density": 0.8, "gamma": 0.05, "scaling": 1.0},
    "breadcrumbs_official_a0.4_b0.15_g0.05": {"density": 0.15, "gamma": 0.05, "scaling": 0.4},
    "tsv_c_1overT": {},
    "tsv_c_0.1": {"sv_reduction": 0.1},
    "tall_masks_lambda0.4": {"mask_lambda": 0.4},
    "lines_ta_beta0.5": {"base": "ta", "beta": 0.5},
    "lines_ties_beta0.5": {"base": "ties", "beta": 0.5},
    "pcb_reference_r0.1": {"variant": "reference", "ratio": 0.1},
    "pcb_reference_r0.05": {"variant": "reference", "ratio": 0.05},
    "pcb_pairwise_r0.05_lam1.0": {"variant": "pairwise", "scaling": 1.0},
    "dare_ta_p0.0_l0.3": {"drop_rate": 0.0, "scaling": 0.3},
}


def test_every_case_is_mapped() -> None:
    assert set(OURS) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_the_reference_implementation(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    method = case["method"]
    theta0, *tuned = (PARITY / "data" / f for f in case["inputs"])
    float32 = case["dtype"] == "float32"
    per_task = get_method(method).per_task_outputs
    out = tmp_path / ("out" if per_task else "out.safetensors")
    result = merge_checkpoints(method, theta0, tuned, out, OURS[name], device="cpu",
                               precision="float32" if float32 else "float64")  # fmt: skip
    expected = [load(PARITY / "data" / f) for f in case["outputs"]]
    if not per_task:
        expected = expected[:1]  # svc_tsvm also stores the TSV-M merge it calibrated
    assert len(result.outputs) == len(expected)
    for path, want in zip(result.outputs, expected, strict=True):
        got = load(path)
        assert all(got[k].dtype == want[k].dtype for k in want)
        if method == "magmax":
            got = _resolve_opposite_ties(got, want, theta0, tuned, OURS[name]["scaling"])
        assert max_rel_diff(got, want) <= (2e-6 if float32 else 1e-12), name


def _resolve_opposite_ties(got: dict, want: dict, theta0: Path, tuned: list[Path], alpha: float) -> dict:
    """MagMax gives an exact |τ| tie to the later task; mergeflow's tasks run in canonical (content) order,
    not the order listed, so where tasks of opposite sign tie exactly the two may pick different ones.
    There (and only there) ours must be θ0 + α·τ of one of the tied tasks; elsewhere it is compared as is."""
    base, tasks = load(theta0), [load(t) for t in tuned]
    out = dict(got)
    for key, value in got.items():
        if not value.is_floating_point():
            continue
        taus = torch.stack([t[key] - base[key] for t in tasks])
        top = taus.abs().amax(dim=0)
        tied = (taus.abs() == top) & (top > 0)
        opposite = (tied & (taus > 0)).any(dim=0) & (tied & (taus < 0)).any(dim=0)
        for index in opposite.nonzero():
            i = tuple(index.tolist())
            candidates = [base[key][i] + alpha * taus[t][i] for t in range(len(tasks)) if tied[t][i]]
            assert any(torch.equal(value[i], c) for c in candidates), (key, i)
        out[key] = torch.where(opposite, want[key], value)
    return out


def test_inputs_hold_the_planted_ties_and_zeros() -> None:
    """The data exercise the tie and zero rules (an opposite-sign pair summing to exactly 0, shared zeros)."""
    theta0 = load(PARITY / "data" / "input_f64_theta0.safetensors")
    tasks = [load(PARITY / "data" / f"input_f64_task_{t}.safetensors") for t in range(3)]
    key = next(k for k in theta0 if k.endswith("resblocks.0.attn.out_proj.weight"))
    taus = torch.stack([t[key][0, 0] - theta0[key][0, 0] for t in tasks])
    assert float(taus.sum()) == 0.0 and float(taus.abs().max()) > 0
