"""MLflow tracking of a zoo report: one experiment per zoo / checkpoint set, a parent run per
report, a nested run per merge method (and per grid point) with its parameters and per-task
metrics, artifacts (results JSON, table, plots) and lineage tags.

The tracking URI is ``MLFLOW_TRACKING_URI`` when set (a team server), else a local SQLite file.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import mergeflow

DEFAULT_URI = "sqlite:///out/mlflow.db"


def tracking_uri(default: str = DEFAULT_URI) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _dvc_lock_hashes(path: Path = Path("dvc.lock")) -> dict[str, str]:
    """md5 of every DVC-tracked output in dvc.lock (when the pipeline ran under DVC)."""
    try:
        import yaml

        lock = yaml.safe_load(path.read_text()) or {}
    except OSError:
        return {}
    hashes = {}
    for stage, body in (lock.get("stages") or {}).items():
        for out in body.get("outs", []) or []:
            if "md5" in out:
                hashes[f"dvc.{stage}.{out['path']}"] = out["md5"]
    return hashes


def lineage_tags(zoo: dict[str, Any]) -> dict[str, str]:
    """Which code, weights and data produced the numbers."""
    from mergeflow.hashing import sha256_file_cached

    tags = {
        "mergeflow.version": mergeflow.__version__,
        "git.commit": _git_commit(),
        "zoo.name": zoo.get("name", "unknown"),
        "theta0.sha256": zoo["theta0"]["sha256"],
    }
    for task, info in zoo["tasks"].items():
        tags[f"finetuned.{task}.sha256"] = sha256_file_cached(info["model"])
        tags[f"data.{task}.sha256"] = info["data_sha256"]
        tags[f"head.{task}.sha256"] = sha256_file_cached(info["head"])
    if "text" in zoo:  # clip zoos: the text tower the zero-shot heads were built from
        tags["text_tower.sha256"] = zoo["text"]["sha256"]
    tags.update(_dvc_lock_hashes())
    return tags


def metric_name(name: str) -> str:
    """MLflow accepts ASCII letters, digits, ``_ - . /`` and spaces in metric names."""
    return re.sub(r"[^A-Za-z0-9_\-./]", "_", name).strip("_")


def _metrics(prefix: str, scores: dict[str, float]) -> dict[str, float]:
    return {metric_name(f"{prefix}.{task}"): float(value) for task, value in scores.items()}


def _sweep_table(sweep: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Grid points as columns: every parameter, the validation score and per-task accuracy."""
    names = sorted({k for p in sweep for k in p["params"]})
    tasks = sorted({t for p in sweep for t in p["validation"]})
    table: dict[str, list[Any]] = {f"param.{n}": [str(p["params"].get(n)) for p in sweep] for n in names}
    table["validation.score"] = [p["score"] for p in sweep]
    for task in tasks:
        table[f"validation.{task}"] = [p["validation"][task] for p in sweep]
    return table


def log_report(report: dict[str, Any], out_dir: str | Path, uri: str | None = None) -> str:
    """Log a :func:`mergeflow.zoo.job.zoo_report` result; returns the parent run id."""
    import mlflow

    from mergeflow.zoo.plots import PLOTS

    out_dir = Path(out_dir)
    from mergeflow.zoo.description import read_zoo

    zoo = read_zoo(report["zoo"])
    mlflow.set_tracking_uri(uri or tracking_uri())
    mlflow.set_experiment(f"mergeflow/{zoo.get('name', 'zoo')}")
    tags = lineage_tags(zoo)
    with mlflow.start_run(run_name="zoo-report", tags=tags) as parent:
        mlflow.log_params({"criterion": report["criterion"], "tasks": ",".join(report["tasks"])})
        for row in report["rows"]:
            name = row["method"]
            with mlflow.start_run(run_name=name, nested=True, tags={**tags, "row": name}):
                mlflow.log_params({"method": name, **{f"param.{k}": v for k, v in row["params"].items()}})
                metrics = {"test.mean": row["mean"], "test.normalized": row["normalized"]}
                metrics |= _metrics("test", row["test"])
                metrics |= _metrics("validation", row.get("validation", {}))
                mlflow.log_metrics(metrics)
                sweep = report["sweeps"].get(name, [])
                if sweep:  # the whole grid: a table artifact, and its scores as a metric series
                    mlflow.log_table(_sweep_table(sweep), "grid.json")
                    for step, point in enumerate(sweep):
                        mlflow.log_metric("grid.validation.score", point["score"], step=step)
                if name in report.get("adaptation", {}):
                    for step, value in enumerate(report["adaptation"][name]["history"]):
                        mlflow.log_metric("adaptation.entropy", value, step=step)
                    mlflow.log_dict(report["adaptation"][name]["coefficients"], "coefficients.json")
        mlflow.log_metrics(_metrics("test.mean", {r["method"]: r["mean"] for r in report["rows"]}))
        for name in ("results.json", "report.md", "metrics.json", *PLOTS):
            if (out_dir / name).exists():
                mlflow.log_artifact(str(out_dir / name))
        return parent.info.run_id


def log_analysis(
    name: str, folder: str | Path, params: dict[str, Any], metrics: dict[str, float], uri: str | None = None
) -> str:
    """One run per analysis in experiment ``mergeflow/analysis``: settings, headline numbers, and the
    analysis folder (figures, JSON, summary) as artifacts. Returns the run id."""
    import mlflow

    mlflow.set_tracking_uri(uri or tracking_uri())
    mlflow.set_experiment("mergeflow/analysis")
    tags = {"mergeflow.version": mergeflow.__version__, "git.commit": _git_commit(), "analysis": name}
    with mlflow.start_run(run_name=name, tags=tags) as run:
        flat = {k: (",".join(map(str, v)) if isinstance(v, list | tuple) else v) for k, v in params.items()}
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
        mlflow.log_metrics({metric_name(k): float(v) for k, v in metrics.items()})
        mlflow.log_artifacts(str(folder))
        return run.info.run_id
