"""The zoo's results table: zero-shot, every fine-tune on every task, every merge method with its
parameters chosen on validation, and AdaMerging; written as results.json, report.md (a Markdown
table), metrics.json and plots. It reads the results of :mod:`mergeflow.zoo.selection` and
:mod:`mergeflow.zoo.adapt` and computes nothing but each row's mean and normalised accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergeflow.writer import write_text_atomic
from mergeflow.zoo.description import read_zoo
from mergeflow.zoo.plots import PLOTS, compression_rows, plot_report, plot_series
from mergeflow.zoo.selection import mean, normalized

__all__ = ["PLOTS", "assemble_report", "compression_rows", "render", "render_compression"]


def assemble_report(
    zoo_dir: str | Path,
    baselines: dict[str, Any],
    selections: Mapping[str, dict[str, Any]],
    out_dir: str | Path,
    criterion: str = "normalized",
) -> dict[str, Any]:
    """Rows with mean and normalised test accuracy; results.json, report.md, metrics.json, plots."""
    zoo_dir, out_dir = Path(zoo_dir), Path(out_dir)
    zoo = read_zoo(zoo_dir)
    tasks = baselines["tasks"]
    rows = [dict(r) for r in baselines["rows"]] + [dict(sel["row"]) for sel in selections.values()]
    for row in rows:
        row["mean"] = mean([row["test"][t] for t in tasks])
        row["normalized"] = normalized(row["test"], baselines["individual"]["test"])
    report = {
        "zoo": str(zoo_dir),
        "zoo_name": zoo.get("name", "zoo"),
        "note": zoo.get("note", ""),
        "theta0_sha256": zoo["theta0"]["sha256"],
        "tasks": tasks,
        "criterion": criterion,
        "rows": rows,
        "sweeps": {method: sel["sweep"] for method, sel in selections.items() if "sweep" in sel},
        "grid_seconds": {m: sel["basis_seconds"] for m, sel in selections.items() if "basis_seconds" in sel},
        "adaptation": {
            name: {"history": sel["history"], "coefficients": sel["coefficients"], "seconds": sel["seconds"]}
            for name, sel in selections.items()
            if "history" in sel
        },
    }
    write_text_atomic(out_dir / "results.json", json.dumps(report, indent=1))
    note = f"\n\nNote: {report['note']}.\n" if report["note"] and report["zoo_name"] != "text-minilm" else "\n"
    write_text_atomic(out_dir / "report.md", render(report) + note + render_compression(report))
    metrics = {r["method"]: {"mean": r["mean"], "normalized": r["normalized"]} for r in rows}
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=1))
    plot_report(report, out_dir)
    write_series(plot_series(report), out_dir / "plots")
    return report


def write_series(series: dict[str, list[dict[str, float]]], folder: Path) -> None:
    """One JSON list of points per series (``folder/<name>.json``); series of an earlier report that
    this one no longer has are removed, so no stale curve is read as current."""
    for name, points in series.items():
        write_text_atomic(folder / f"{name}.json", json.dumps(points, indent=1))
    wanted = {folder / f"{name}.json" for name in series}
    for old in folder.rglob("*.json") if folder.is_dir() else ():
        if old not in wanted:
            old.unlink()


# selection plumbing, not a choice the grid made
HIDDEN_PARAMS = ("exclude", "include", "svd_solver")


def render(report: dict[str, Any]) -> str:
    """Markdown: one row per model, the test accuracies first and the chosen parameters last (a long
    parameter list then never pushes the numbers out of a narrow view, such as Prefect's artifact page)."""
    tasks = report["tasks"]
    lines = [
        "| model | " + " | ".join(tasks) + " | mean | normalized | chosen parameters |",
        "|---" * (len(tasks) + 4) + "|",
    ]
    for row in report["rows"]:
        shown = {k: v for k, v in row["params"].items() if k not in HIDDEN_PARAMS and v is not None}
        params = ", ".join(f"{k}={v}" for k, v in shown.items())
        cells = " | ".join(f"{100 * row['test'][t]:.1f}" for t in tasks)
        lines.append(
            f"| {row['method']} | {cells} | {100 * row['mean']:.1f} | {100 * row['normalized']:.1f} | {params or '–'} |"
        )
    return "\n".join(lines)


def render_compression(report: dict[str, Any]) -> str:
    """Markdown: normalised accuracy against bytes stored per task beyond θ0."""
    rows = compression_rows(report)
    if not rows:
        return ""
    lines = ["\n## Compression: accuracy against storage per task\n",
             "| method | stored per task (MB) | shared, once (MB) | normalized |", "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        shared = "–" if r["shared_bytes"] is None else f"{r['shared_bytes'] / 1e6:.1f}"
        lines.append(f"| {r['method']} | {r['per_task_bytes'] / 1e6:.2f} | {shared} | {100 * r['normalized']:.1f} |")
    lines.append("\nShared: what every task model uses (θ_avg, τ_MTL, τ_uni); one merged model stores none per task.")
    return "\n".join(lines) + "\n"
