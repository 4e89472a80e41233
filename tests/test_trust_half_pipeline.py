"""Selection on bfloat16 / float16 checkpoints: the grid point that wins on validation is the model
that is then merged exactly and tested (the bf16 grid shift of older versions picked other points)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergeflow.checkpoint import read_state_dict
from mergeflow.writer import save_state_dict
from mergeflow.zoo.registry import evaluate_checkpoint
from mergeflow.zoo.text_zoo import TextZooConfig, build_text_zoo


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selection_on_half_precision_checkpoints_scores_the_exact_merge(tmp_path: Path, dtype: torch.dtype) -> None:
    from mergeflow.zoo.job import zoo_report

    cfg = TextZooConfig(tasks=("language", "emoji"), train=32, validation=16, test=32, layers=2, max_length=32)
    zoo = build_text_zoo(tmp_path / "zoo", cfg)
    for path in [zoo["theta0"]["file"], *(info["model"] for info in zoo["tasks"].values())]:
        state = read_state_dict(path)
        save_state_dict(path, {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
    methods = {"task_arithmetic": {}, "cart": {}, "tsv": {}}
    grids = {
        "task_arithmetic": {"scaling": [0.3, 0.6, 1.0]},
        "cart": {"rank_ratio": [0.1, 0.5], "scaling": [1.0, 2.0]},
        "tsv": {"scaling": [0.5, 1.0]},
    }
    out = tmp_path / "report"
    report = zoo_report(tmp_path / "zoo", methods, grids, out)
    rows = {r["method"]: r for r in report["rows"]}
    for method in methods:
        best = max(report["sweeps"][method], key=lambda p: p["score"])
        merged = Path(rows[method]["outputs"][0])
        assert all(v.dtype == dtype for v in read_state_dict(merged).values() if v.is_floating_point())
        exact = evaluate_checkpoint(tmp_path / "zoo", merged, "validation")
        assert {t: r["accuracy"] for t, r in exact.items()} == best["validation"], method
    assert json.loads((tmp_path / "zoo" / "zoo.json").read_text())["tasks"]
