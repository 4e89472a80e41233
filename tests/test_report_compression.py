"""The report's compression comparison (per-task methods against the best single merged model) and its
curves as data series."""

from __future__ import annotations

import json
from pathlib import Path

from mergeflow.zoo.plots import plot_report, plot_series
from mergeflow.zoo.report import render_compression, write_series


def _row(method: str, normalized: float, storage: dict | None = None, grid: int = 3) -> dict:
    row = {"method": method, "params": {}, "test": {"a": normalized, "b": normalized}, "grid_points": grid,
           "mean": normalized, "normalized": normalized}  # fmt: skip
    return row | ({"storage": storage} if storage else {})


def test_compression_table_ranks_per_task_methods_beside_the_best_single_model(tmp_path: Path) -> None:
    report = {"tasks": ["a", "b"], "zoo_name": "toy", "rows": [
        {"method": "zero-shot (θ0)", "params": {}, "test": {"a": 0.2, "b": 0.2}, "mean": 0.2, "normalized": 0.3},
        _row("task_arithmetic", 0.90), _row("cart", 0.95),
        _row("tsv_c", 0.97, {"shared_bytes": 0, "per_task_bytes": 2_500_000, "tasks": 2, "total_bytes": 5_000_000}),
        _row("emr", 0.99, {"shared_bytes": 8_000_000, "per_task_bytes": 250_004, "tasks": 2, "total_bytes": 8_500_008}),
    ]}  # fmt: skip
    text = render_compression(report)
    lines = [line for line in text.splitlines() if line.startswith("| ") and "method" not in line]
    assert lines == [
        "| emr | 0.25 | 8.0 | 99.0 |",
        "| tsv_c | 2.50 | 0.0 | 97.0 |",
        "| cart | 0.00 | – | 95.0 |",  # the best single merged model, nothing stored per task
    ]
    plot_report(report | {"sweeps": {}, "adaptation": {}}, tmp_path)
    assert (tmp_path / "compression.png").stat().st_size > 1000


def test_no_per_task_method_no_compression_section(tmp_path: Path) -> None:
    assert render_compression({"tasks": ["a"], "rows": [_row("cart", 0.9)]}) == ""


def _point(method: str, score: float, **params: float) -> dict:
    return {"params": params, "score": score, "validation": {}}


def test_curves_are_data_series_and_stale_ones_are_removed(tmp_path: Path) -> None:
    sweeps = {
        "cart": [_point("cart", 0.5, rank_ratio=0.1, scaling=1.0), _point("cart", 0.7, rank_ratio=0.1, scaling=2.0),
                 _point("cart", 0.6, rank_ratio=0.2, scaling=1.0), _point("cart", 0.4, rank_ratio=0.2, scaling=2.0)],
        "ties": [_point("ties", 0.3, scaling=0.5), _point("ties", 0.2, scaling=1.0)],
        "lines": [_point("lines", 0.3, beta=0.5), _point("lines", 0.2, beta=1.0)],
    }  # fmt: skip
    series = plot_series({"sweeps": sweeps})
    assert series["rank_curve"] == [{"rank_ratio": 0.1, "score": 70.0}, {"rank_ratio": 0.2, "score": 60.0}]
    assert series["scaling/cart"] == [{"scaling": 1.0, "score": 60.0}, {"scaling": 2.0, "score": 70.0}]
    assert series["scaling/ties"] == [{"scaling": 0.5, "score": 30.0}, {"scaling": 1.0, "score": 20.0}]
    assert set(series) == {"rank_curve", "scaling/cart", "scaling/ties"}  # no scaling axis, no curve
    folder = tmp_path / "plots"
    (folder / "scaling").mkdir(parents=True)
    (folder / "scaling" / "dropped.json").write_text("[]")  # a method an earlier report had
    write_series(series, folder)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.json")) == [
        "rank_curve.json",
        "scaling/cart.json",
        "scaling/ties.json",
    ]
    assert json.loads((folder / "rank_curve.json").read_text()) == series["rank_curve"]
