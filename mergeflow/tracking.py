"""MLflow tracking of a zoo report: one experiment per zoo / checkpoint set (a model-training
experiment: tag ``mlflow.experimentKind = custom_model_development``), a parent run per report named
for what ran (zoo, preset, start time) and a nested run per row (merge method, baseline,
AdaMerging) with its parameters, per-task metrics and grid; each merged model as an MLflow logged
model (:mod:`mergeflow.mlflow_models`) and the best registered as ``models:/mergeflow-<zoo>@champion``;
θ0, fine-tunes and data splits as dataset inputs; lineage tags (:mod:`mergeflow.lineage`).

The parent run starts when the work started (``TrackingContext.started_at``, from the caller) and
ends when logging ends, so its duration covers the work. Its headline metrics ``test.mean`` and
``test.normalized`` are the champion's; ``mergeflow.cached`` says whether every pipeline step was
served from the cache (``true``), some were computed (``false``) or the caller did not say (absent).

The tracking URI is ``MLFLOW_TRACKING_URI`` when set (a team server), else a local SQLite file;
a new experiment on a SQLite store keeps its artifacts in ``mlartifacts/`` beside the database.
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mergeflow.lineage import code_tags, lineage_tags, mlflow_dataset_inputs, zoo_inputs
from mergeflow.mlflow_models import ModelsToLog, champion_row, log_merged_model, register_champion

DEFAULT_URI = "sqlite:///out/mlflow.db"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
Span = tuple[float, float]  # (start, end) unix times in seconds


class TrackingContext(BaseModel):
    """What the caller of :func:`log_report` knows about the run that the report does not."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    started_at: float | None = Field(None, description="unix time (s) the work started; None: now")
    preset: str | None = None
    config: dict[str, Any] | None = Field(None, description="the fully resolved configuration (JSON)")
    flow_run_id: str | None = Field(None, description="the Prefect flow run that produced the report")
    steps: dict[str, str] = Field(default_factory=dict, description="pipeline step -> final state name")
    spans: dict[str, Span] = Field(default_factory=dict, description="pipeline step -> (start, end) of its work")
    models: ModelsToLog = "all"


def tracking_uri(default: str = DEFAULT_URI) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default


def experiment_id(name: str, uri: str) -> str:
    """The experiment ``name`` (created when missing), tagged as a model-training experiment."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if uri.startswith("sqlite:///"):  # artifacts beside the database, not in the working directory
            location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
        try:
            return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
        except MlflowException:  # created meanwhile by a concurrent run
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if EXPERIMENT_KIND[0] not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return experiment.experiment_id


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys to JSON leaf values (lists and scalars), as MLflow params (values cut at 6000 chars)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten(value, dotted + ".")
        else:
            flat[dotted] = (value if isinstance(value, str) else json.dumps(value))[:6000]
    return flat


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
    table["validation.share"] = [p.get("validation_share", 1.0) for p in sweep]  # < 1: pruned by halving
    for task in tasks:
        table[f"validation.{task}"] = [p["validation"][task] for p in sweep]
    return table


def run_name(zoo_name: str, preset: str | None, started_at: float) -> str:
    """``<zoo> · <preset or params.yaml> · <UTC start, to the minute>``."""
    when = datetime.fromtimestamp(started_at, UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"{zoo_name} · {preset or 'params.yaml'} · {when}"


def context_tags(context: TrackingContext) -> dict[str, str]:
    """Tags from the caller: preset, Prefect flow run, each step's state and whether all were cached."""
    tags = {"mergeflow.preset": context.preset or "none"}
    if context.flow_run_id:
        tags["prefect.flow_run_id"] = context.flow_run_id
    if context.steps:
        tags["mergeflow.cached"] = str(all(state == "Cached" for state in context.steps.values())).lower()
        tags |= {f"mergeflow.step.{metric_name(step)}": state for step, state in context.steps.items()}
    return tags


def row_span(name: str, spans: dict[str, Span]) -> Span | None:
    """The (start, end) of the pipeline step that produced row ``name``: its ``select``/``adapt`` task,
    else the baselines step (θ0 and the fine-tunes); None when the caller gave no spans."""
    return spans.get(f"select:{name}") or spans.get(f"adapt:{name}") or spans.get("baselines")


def _log_row(row: dict[str, Any], report: dict[str, Any], tags: dict[str, str], model_tags: dict[str, str] | None,
             datasets: list[Any], parent_id: str, span: Span | None) -> tuple[str, Any | None]:  # fmt: skip
    """One nested run for a row; its merged model logged when ``model_tags`` is given. Returns (run id, model).

    With a ``span`` the run starts and ends when the row's step did (a cached step: the instant it was
    served), so the runs table shows the time each merge took, not the time its logging took."""
    import mlflow
    from mlflow.tracking.context.registry import resolve_tags  # MLflow's own source/user tags

    name = row["method"]
    client = mlflow.MlflowClient()
    start = int((span[0] if span else time.time()) * 1000)
    created = client.create_run(mlflow.active_run().info.experiment_id, start_time=start, run_name=name,
                                tags=resolve_tags({**tags, "row": name, "mlflow.parentRunId": parent_id}))  # fmt: skip
    with mlflow.start_run(run_id=created.info.run_id, nested=True) as run:
        run_id = run.info.run_id
        client.log_inputs(run_id, datasets=datasets)
        mlflow.log_params({"method": name, **{f"param.{k}": v for k, v in row["params"].items()}})
        model = None
        if model_tags is not None and row.get("outputs"):
            model = log_merged_model(client, run.info.experiment_id, run_id, row, model_tags)
        metrics = {"test.mean": row["mean"], "test.normalized": row["normalized"]}
        metrics |= _metrics("test", row["test"])
        metrics |= _metrics("validation", row.get("validation", {}))
        mlflow.log_metrics(metrics, model_id=model.model_id if model is not None else None)
        sweep = report["sweeps"].get(name, [])
        if sweep:  # the whole grid: a table artifact, and its scores as a metric series
            mlflow.log_table(_sweep_table(sweep), "grid.json")
            for step, point in enumerate(sweep):
                mlflow.log_metric("grid.validation.score", point["score"], step=step)
        if name in report.get("adaptation", {}):
            for step, value in enumerate(report["adaptation"][name]["history"]):
                mlflow.log_metric("adaptation.entropy", value, step=step)
            mlflow.log_dict(report["adaptation"][name]["coefficients"], "coefficients.json")
    if span:
        client.set_terminated(run_id, "FINISHED", end_time=max(start, int(span[1] * 1000)))
    return run_id, model


def log_report(
    report: dict[str, Any], out_dir: str | Path, uri: str | None = None, context: TrackingContext | None = None
) -> str:
    """Log a :func:`mergeflow.zoo.job.zoo_report` result; returns the parent run id."""
    import mlflow
    from mlflow.entities import LoggedModelOutput

    from mergeflow.zoo.description import read_zoo
    from mergeflow.zoo.plots import PLOTS

    context = context or TrackingContext()
    out_dir, uri = Path(out_dir), uri or tracking_uri()
    zoo = read_zoo(report["zoo"])
    zoo_name = zoo.get("name", "zoo")
    mlflow.set_tracking_uri(uri)
    experiment = experiment_id(f"mergeflow/{zoo_name}", uri)
    mlflow.set_experiment(experiment_id=experiment)  # nested runs go where their parent is
    inputs = zoo_inputs(zoo)
    datasets = mlflow_dataset_inputs(inputs)
    tags = lineage_tags(zoo, inputs)
    champion = champion_row(report)
    started = context.started_at if context.started_at is not None else time.time()
    client = mlflow.MlflowClient(uri)
    parent_tags = {
        **tags,
        **context_tags(context),
        "mergeflow.champion_method": champion["method"] if champion else "none",
    }
    from mlflow.tracking.context.registry import resolve_tags  # MLflow's own source/user tags, as start_run adds

    created = client.create_run(experiment, start_time=int(started * 1000), tags=resolve_tags(parent_tags),
                                run_name=run_name(zoo_name, context.preset, started))  # fmt: skip
    with mlflow.start_run(run_id=created.info.run_id) as parent:
        client.log_inputs(parent.info.run_id, datasets=datasets)
        mlflow.log_params({"criterion": report["criterion"], "tasks": ",".join(report["tasks"]),
                           "preset": context.preset or "none", "models_logged": context.models})  # fmt: skip
        if context.config is not None:  # the resolved configuration: a JSON artifact and dotted params
            mlflow.log_dict(context.config, "config.json")
            mlflow.log_params({f"config.{k}": v for k, v in flatten(context.config).items()})
        model_tags = {k: v for k, v in tags.items() if not k.startswith(("mlflow.", "head.", "data."))}
        model_tags["mergeflow.report_run"] = parent.info.run_id
        for row in report["rows"]:
            logs_model = context.models == "all" or (context.models == "champion" and row is champion)
            run_id, model = _log_row(
                row,
                report,
                tags,
                model_tags if logs_model else None,
                datasets,
                parent.info.run_id,
                row_span(row["method"], context.spans),
            )
            if row is champion and model is not None:
                version = register_champion(client, zoo_name, row, model, run_id, model_tags, report["criterion"])
                mlflow.set_tag("mergeflow.champion_version", f"{version.name}/{version.version}")
                client.log_outputs(parent.info.run_id, [LoggedModelOutput(model.model_id, 0)])  # shown on the parent
        if champion is not None:  # the headline: the champion's numbers, in the same columns as the children's
            mlflow.log_metrics({"test.mean": champion["mean"], "test.normalized": champion["normalized"]})
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

    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=experiment_id("mergeflow/analysis", uri))
    tags = {**code_tags(), "analysis": name}
    with mlflow.start_run(run_name=name, tags=tags) as run:
        flat = {k: (",".join(map(str, v)) if isinstance(v, list | tuple) else v) for k, v in params.items()}
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
        mlflow.log_metrics({metric_name(k): float(v) for k, v in metrics.items()})
        mlflow.log_artifacts(str(folder))
        return run.info.run_id
