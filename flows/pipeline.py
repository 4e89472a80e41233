"""The main pipeline as a Prefect flow: build the zoo -> baselines -> one selection task per merge
method (a grid basis from one merge pass, every grid point scored on validation as its own task,
the best merged exactly and tested once) and one task per AdaMerging variant -> report -> MLflow.

Every expensive step is a task cached by the content of its inputs (see ``tasks/``): rerunning
with nothing changed returns cached results; changing one method's parameters reruns only that
method's task. A cached result whose files have vanished from disk is recomputed, not trusted.
Method and adaptation tasks go through a task runner the flow builds from the resolved
configuration (:func:`flows.runners.task_runner`): ``workers`` threads, or a Dask cluster when
``dask_address`` is set, where each ``select`` task also sends its grid points to the cluster.
``mergeflow run``, a served deployment and a deployment run by a worker (``prefect.yaml``)
therefore all honour the same settings, whatever launched them. MLflow's child runs span the
Prefect task runs that computed them (:func:`step_spans`).

Everything the flow writes happens under :func:`flows.locks.report_lock`: a second run on the
same report directory waits for the first (up to ``lock_timeout_s``, then fails with one line).
A finished run records what it was computed from (:mod:`flows.uptodate`), so ``mergeflow run``
with nothing changed answers without starting Prefect. The flow ends with a Markdown artifact:
the results table and the MLflow run.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.locks import report_lock
from flows.runners import task_runner
from flows.uptodate import run_key, write_record
from mergeflow.config import load_config
from mergeflow.tracking import TrackingContext, tracking_uri
from mergeflow.zoo.description import zoo_files
from mergeflow.zoo.report import render
from tasks.caching import files_exist
from tasks.pipeline_tasks import adapt, baselines, build_zoo, report, select, track

log = logging.getLogger("mergeflow.pipeline")

NIGHTLY_CRON = "0 2 * * *"
LOCK_TIMEOUT_S = 12 * 3600.0  # a nightly run waits this long for a previous run on its report directory
INTERVAL_LEAD_S = 10.0  # an interval deployment's first run comes due this long after it is served


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
    lock_timeout_s: float = LOCK_TIMEOUT_S,
) -> dict[str, Any]:
    """Run the job described by ``params_file``, a run ``preset`` overlay and dotted ``overrides``
    (all validated before any work starts); wait up to ``lock_timeout_s`` for another run on the
    same report directory to finish."""
    cfg = load_config(params_file, overrides, preset)
    out_dir = str(cfg.report_path())
    uri = mlflow_uri or tracking_uri(cfg.tracking.uri)
    key = run_key(cfg, uri if track_mlflow else None)  # at the start: what this run computes from
    with report_lock(out_dir, lock_timeout_s), task_runner(cfg.workers, cfg.dask_address) as runner:
        started = time.time()  # the work starts once the report directory is ours (the MLflow run's start)
        zoo_args = (str(cfg.zoo.dir), cfg.zoo.settings(), cfg.zoo.name)
        zoo_state = _state_of(
            build_zoo(*zoo_args, return_state=True),
            lambda zoo: files_exist(zoo_files(zoo)),
            lambda: build_zoo.with_options(refresh_cache=True)(*zoo_args, return_state=True),
        )
        zoo = zoo_state.result()
        base_state = baselines(zoo, out_dir, return_state=True)
        base = base_state.result()
        states = {"build-zoo": zoo_state, "baselines": base_state}
        schedule = cfg.selection.schedule()
        halving = None if schedule is None else schedule.model_dump(mode="json")
        calls = {
            ("select", method): {
                "zoo": zoo, "method": method, "base": dict(params), "grid": dict(cfg.selection.grids.get(method, {})),
                "criterion": cfg.selection.criterion, "device": cfg.device, "out_dir": out_dir,
                "individual": base["individual"], "workers": cfg.workers, "halving": halving,
            }
            for method, params in cfg.methods.items()
        }  # fmt: skip
        calls |= {
            ("adapt", name): {
                "zoo": zoo, "name": name, "params": params.model_dump(mode="json"), "out_dir": out_dir,
                "device": cfg.device,
            }
            for name, params in cfg.adaptation.items()
        }  # fmt: skip
        steps_of = {"select": select, "adapt": adapt}
        futures = {key: runner.submit(steps_of[key[0]], parameters) for key, parameters in calls.items()}
        selections = {}
        for (kind, name), future in futures.items():
            future.wait()
            step, parameters = steps_of[kind], calls[kind, name]
            state = _state_of(
                future.state,
                lambda sel: files_exist(sel["row"]["outputs"]),
                lambda step=step, parameters=parameters: step.with_options(refresh_cache=True)(
                    **parameters, return_state=True
                ),
            )
            states[f"{kind}:{name}"] = state
            selections[name] = state.result()
        steps = {step: state.name for step, state in states.items()}
        result = report(zoo, base, selections, out_dir, cfg.selection.criterion)
        context = TrackingContext(started_at=started, preset=cfg.preset, config=cfg.model_dump(mode="json"),
                                  flow_run_id=flow_run.id, steps=steps, spans=step_spans(states),
                                  models=cfg.tracking.models)  # fmt: skip
        run_id = track(result, out_dir, uri, context) if track_mlflow else None
        table = render(result)
        write_record(cfg, key, table, str(flow_run.id) if flow_run.id else None, run_id)
    key = artifact_key(cfg.zoo.name, out_dir)
    create_markdown_artifact(
        markdown=report_markdown(table, steps, run_id, uri, mlflow_run_url(uri, run_id) if run_id else None),
        key=key,
        description=f"mergeflow report of {out_dir}",
    )
    log.info("results table in Prefect artifact %s", key)
    return {"steps": steps, "mlflow_run": run_id, "table": table}


def step_spans(states: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Each step's (start, end) unix times, from its task run on the Prefect API (a step served from the
    cache never runs: its span is the instant it was served). Empty, with a warning, if the API fails."""
    from prefect import get_client

    spans = {}
    try:
        with get_client(sync_client=True) as client:
            for step, state in states.items():
                run = client.read_task_run(state.state_details.task_run_id)
                end = run.end_time or state.timestamp
                spans[step] = ((run.start_time or end).timestamp(), end.timestamp())
    except Exception as exc:  # the spans only shape MLflow's durations: never fail a finished run for them
        log.warning("step durations not read from the Prefect API (%s): MLflow shows logging times", exc)
        return {}
    return spans


def artifact_key(zoo_name: str, report_dir: str | Path) -> str:
    """The artifact key of a report directory (lowercase letters, digits and dashes, as Prefect requires)."""
    digest = hashlib.sha256(str(Path(report_dir).expanduser().resolve()).encode()).hexdigest()[:8]
    return f"mergeflow-{re.sub(r'[^a-z0-9]+', '-', zoo_name.lower()).strip('-')}-report-{digest}"


def mlflow_run_url(uri: str, run_id: str) -> str | None:
    """The MLflow UI page of a run on an HTTP tracking server (None for a file or SQLite store, or
    when the server cannot say which experiment the run is in: the link is a convenience)."""
    if not uri.startswith(("http://", "https://")):
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        experiment = MlflowClient(uri).get_run(run_id).info.experiment_id
    except (MlflowException, OSError) as exc:
        log.warning("no link to MLflow run %s: %s", run_id, exc)
        return None
    # MLflow 3's UI opens an experiment as GenAI or model training by this switch (a per-browser default
    # otherwise), not by the experiment's mlflow.experimentKind tag
    return f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"


def report_markdown(table: str, steps: dict[str, str], run_id: str | None, uri: str | None, run_url: str | None) -> str:
    """The flow run's artifact: the results table, how each step ended, and where the MLflow run is."""
    if run_id is None:
        mlflow_line = "MLflow: not tracked (`--no-mlflow`)."
    elif run_url:
        mlflow_line = f"MLflow run: [{run_id}]({run_url})"
    else:
        mlflow_line = f"MLflow run: `{run_id}` in `{uri}` (open it with `mlflow ui --backend-store-uri {uri}`)"
    step_lines = "\n".join(f"| {step} | {state} |" for step, state in steps.items())
    return f"## Results (test accuracy, %)\n\n{table}\n\n{mlflow_line}\n\n| step | state |\n|---|---|\n{step_lines}\n"


def nightly_deployment(
    params_file: str = "params.yaml",
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    cron: str = NIGHTLY_CRON,
    interval_s: float | None = None,
    name: str = "nightly",
) -> Any:
    """The scheduled merge of the configured zoo (``mergeflow serve`` runs it): on ``cron``, or every
    ``interval_s`` seconds starting :data:`INTERVAL_LEAD_S` after now. The deployment carries the
    preset and overrides as parameters, so every run it starts resolves the same configuration."""
    from prefect.schedules import Cron, Interval
    from prefect.types.entrypoint import EntrypointType

    parameters: dict[str, Any] = {"params_file": params_file}
    if preset:
        parameters["preset"] = preset
    if overrides:
        parameters["overrides"] = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
    if interval_s is None:
        schedule = Cron(cron)
    else:
        anchor = datetime.now(UTC) + timedelta(seconds=INTERVAL_LEAD_S)
        schedule = Interval(timedelta(seconds=interval_s), anchor_date=anchor)
    return pipeline.to_deployment(  # a module entrypoint: found wherever mergeflow is installed, whatever the cwd
        name=name, schedule=schedule, parameters=parameters, entrypoint_type=EntrypointType.MODULE_PATH
    )
