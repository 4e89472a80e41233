"""The report's compression comparison: per-task methods against the best single merged model."""

from __future__ import annotations

from pathlib import Path

from mergeflow.zoo.plots import plot_report
from mergeflow.zoo.report import render_compression


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
