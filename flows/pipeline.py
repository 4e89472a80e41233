"""The main pipeline as a Prefect flow: build the zoo -> baselines -> one selection task per merge
method (a grid basis from one merge pass, every grid point scored on validation as its own task,
the best merged exactly and tested once) and one task per AdaMerging variant -> report -> MLflow.

Every expensive step is a task cached by the content of its inputs (see ``tasks/``): rerunning
with nothing changed returns cached results; changing one method's parameters reruns only that
method's task. A cached result whose files have vanished from disk is recomputed, not trusted.
Method tasks go through the flow's task runner: ``workers`` in params.yaml sets how many run at
once (threads here; the same flow runs on a Dask cluster given a Dask task runner).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from mergeflow.config import load_config
from mergeflow.tracking import tracking_uri
from mergeflow.zoo.build import zoo_files
from mergeflow.zoo.report import render
from tasks.caching import files_exist
from tasks.pipeline_tasks import adapt, baselines, build_zoo, report, select, track

NIGHTLY_CRON = "0 2 * * *"


def _state_of(state: Any, valid: Any, rerun: Any) -> Any:
    """``state``, unless its result's files have vanished from disk: then ``rerun()`` (cache refreshed)."""
    return state if valid(state.result()) else rerun()


@flow(name="mergeflow-pipeline")
def pipeline(
    params_file: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    preset: str | None = None,
    track_mlflow: bool = True,
    mlflow_uri: str | None = None,
) -> dict[str, Any]:
    """Run the job described by ``params_file``, a run ``preset`` overlay and dotted ``overrides``
    (all validated before any work starts)."""
    cfg = load_config(params_file, overrides, preset)
    out_dir = str(Path(cfg.zoo.dir) / "report")
    zoo_args = (str(cfg.zoo.dir), cfg.zoo.settings(), cfg.zoo.name)
    zoo_state = _state_of(
        build_zoo(*zoo_args, return_state=True),
        lambda zoo: files_exist(zoo_files(zoo)),
        lambda: build_zoo.with_options(refresh_cache=True)(*zoo_args, return_state=True),
    )
    zoo = zoo_state.result()
    base_state = baselines(zoo, out_dir, return_state=True)
    base = base_state.result()
    steps = {"build-zoo": zoo_state.name, "baselines": base_state.name}
    calls = {
        method: (
            zoo,
            method,
            dict(params),
            dict(cfg.selection.grids.get(method, {})),
            cfg.selection.criterion,
            cfg.device,
            out_dir,
            base["individual"],
            cfg.workers,
        )
        for method, params in cfg.methods.items()
    }
    adaptations = {
        name: (zoo, name, params.model_dump(mode="json"), out_dir, cfg.device)
        for name, params in cfg.adaptation.items()
    }
    futures = {("select", m): select.submit(*args) for m, args in calls.items()}
    futures |= {("adapt", n): adapt.submit(*args) for n, args in adaptations.items()}
    selections = {}
    for (kind, name), future in futures.items():
        future.wait()
        step, args = (select, calls[name]) if kind == "select" else (adapt, adaptations[name])
        state = _state_of(
            future.state,
            lambda sel: files_exist(sel["row"]["outputs"]),
            lambda step=step, args=args: step.with_options(refresh_cache=True)(*args, return_state=True),
        )
        steps[f"{kind}:{name}"] = state.name
        selections[name] = state.result()
    result = report(zoo, base, selections, out_dir, cfg.selection.criterion)
    run_id = track(result, out_dir, mlflow_uri or tracking_uri(cfg.tracking.uri)) if track_mlflow else None
    return {"steps": steps, "mlflow_run": run_id, "table": render(result)}


def nightly_deployment(params_file: str = "params.yaml") -> Any:
    """The scheduled nightly merge of the configured zoo (``mergeflow serve`` runs it)."""
    return pipeline.to_deployment(name="nightly", cron=NIGHTLY_CRON, parameters={"params_file": params_file})
