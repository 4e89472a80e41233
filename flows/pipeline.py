"""The main pipeline as a Prefect flow: build the zoo -> merge, evaluate, select -> track in MLflow.

Every step is a task cached by the content of its inputs (see ``tasks/``): rerunning with nothing
changed returns cached results; changing a merge parameter reruns only the merge/evaluation step.
A step whose outputs have disappeared from disk is recomputed even if its cache entry exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow

from mergeflow.config import load_config
from mergeflow.zoo.report import render
from tasks.caching import files_exist
from tasks.pipeline_tasks import build_zoo, merge_and_evaluate, track

NIGHTLY_CRON = "0 2 * * *"


def _zoo_on_disk(zoo_dir: Path) -> bool:
    try:
        zoo = json.loads((zoo_dir / "zoo.json").read_text())
    except (OSError, ValueError):
        return False
    files = [zoo["theta0"]["file"]] + [f for t in zoo["tasks"].values() for f in (t["model"], t["head"], t["data"])]
    return files_exist(files)


def _report_on_disk(out_dir: Path) -> bool:
    try:
        report = json.loads((out_dir / "results.json").read_text())
    except (OSError, ValueError):
        return False
    chosen = [max(points, key=lambda p: p["score"])["outputs"] for points in report["sweeps"].values()]
    return files_exist(p for outputs in chosen for p in outputs)


@flow(name="mergeflow-pipeline")
def pipeline(
    params_file: str = "params.yaml", track_mlflow: bool = True, mlflow_uri: str | None = None
) -> dict[str, Any]:
    """Run the whole job described by ``params_file`` (validated before any work starts)."""
    cfg = load_config(params_file)
    zoo_dir = Path(cfg.zoo.dir)
    out_dir = zoo_dir / "report"
    zoo_state = build_zoo.with_options(refresh_cache=not _zoo_on_disk(zoo_dir))(
        str(zoo_dir), cfg.zoo.text_minilm.model_dump(mode="json"), return_state=True
    )
    zoo = zoo_state.result()
    report_state = merge_and_evaluate.with_options(refresh_cache=not _report_on_disk(out_dir))(
        zoo, dict(cfg.methods), dict(cfg.selection.grids), cfg.selection.criterion, cfg.device, str(out_dir),
        return_state=True,
    )  # fmt: skip
    report = report_state.result()
    run_id = track(report, str(out_dir), mlflow_uri) if track_mlflow else None
    return {
        "steps": {"build-zoo": zoo_state.name, "merge-evaluate-select": report_state.name},
        "mlflow_run": run_id,
        "table": render(report),
    }


def nightly_deployment(params_file: str = "params.yaml") -> Any:
    """The scheduled nightly merge of the configured zoo (``mergeflow serve`` runs it)."""
    return pipeline.to_deployment(name="nightly", cron=NIGHTLY_CRON, parameters={"params_file": params_file})
