"""The Prefect pipeline: content-keyed caching of its steps, MLflow runs, the nightly deployment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import prefect_harness
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from flows.pipeline import NIGHTLY_CRON, nightly_deployment, pipeline


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path_factory.mktemp("results")}), prefect_harness():
        yield


def _params(path: Path, cart_scaling: float) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "device": "cpu",
                "zoo": {
                    "dir": str(path.parent / "zoo"),
                    "text_minilm": {"tasks": ["language", "emoji"], "train": 32, "validation": 16, "test": 32,
                                    "layers": 2, "max_length": 32},
                },
                "methods": {"weight_average": {}, "cart": {"scaling": cart_scaling}},
                "selection": {"grids": {"cart": {"rank_ratio": [0.25, 1.0], "scaling": [1.0, cart_scaling]}}},
                "adaptation": {"adamerging": {"steps": 2, "batch_size": 4}},
            }
        )
    )  # fmt: skip
    return path


def test_steps_are_cached_by_content(prefect_server, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = _params(tmp_path / "params.yaml", cart_scaling=2.0)
    steps = ["build-zoo", "baselines", "select:weight_average", "select:cart", "adapt:adamerging"]
    first = pipeline(params_file=str(params), mlflow_uri=uri)
    assert first["steps"] == dict.fromkeys(steps, "Completed")
    zoo_built_ms = (tmp_path / "zoo" / "zoo.json").stat().st_mtime * 1000
    assert "| cart |" in first["table"]

    again = pipeline(params_file=str(params), mlflow_uri=uri)  # nothing changed
    assert again["steps"] == dict.fromkeys(steps, "Cached")
    assert again["table"] == first["table"]

    changed = pipeline(params_file=str(_params(params, cart_scaling=1.5)), mlflow_uri=uri)  # one CART parameter
    assert changed["steps"] == {**dict.fromkeys(steps, "Cached"), "select:cart": "Completed"}

    chosen = next(Path(p) for p in (tmp_path / "zoo" / "report" / "merged").glob("weight_average-*"))
    chosen.unlink()  # a cached step's output vanished: recomputed, not trusted
    (tmp_path / "zoo" / "models" / "emoji.safetensors").unlink()
    rebuilt = pipeline(params_file=str(params), mlflow_uri=uri)
    assert rebuilt["steps"]["build-zoo"] == "Completed" and rebuilt["steps"]["select:weight_average"] == "Completed"
    assert (tmp_path / "zoo" / "models" / "emoji.safetensors").exists() and chosen.exists()

    client = MlflowClient(uri)
    parents = [result["mlflow_run"] for result in (first, again, changed, rebuilt)]
    assert len(set(parents)) == 4 and all(client.get_run(p).data.tags["theta0.sha256"] for p in parents)
    runs = [client.get_run(p) for p in parents]
    assert [r.data.tags["mergeflow.cached"] for r in runs] == ["false", "true", "false", "false"]
    assert all(len(r.data.tags["prefect.flow_run_id"]) == 36 for r in runs)  # a UUID from prefect.runtime
    assert runs[2].data.params["config.methods.cart.scaling"] == "1.5" and runs[0].data.params["config.workers"] == "1"
    assert runs[0].info.start_time <= zoo_built_ms  # the run covers the work: it starts before the zoo is built
    children = [{c.info.run_name: c.info for c in client.search_runs([r.info.experiment_id],
                                                                       f"tags.mlflow.parentRunId = '{r.info.run_id}'")}
                for r in runs[:2]]  # fmt: skip
    computed, cached = (kids["cart"] for kids in children)  # a child run spans its step's task run
    assert runs[0].info.start_time <= computed.start_time < computed.end_time <= runs[0].info.end_time
    assert cached.end_time - cached.start_time < computed.end_time - computed.start_time


def test_a_rerun_with_nothing_changed_answers_from_the_run_record(prefect_server, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from flows.uptodate import current_record
    from mergeflow.config import load_config

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = _params(tmp_path / "params.yaml", cart_scaling=2.0)
    first = pipeline(params_file=str(params), mlflow_uri=uri)
    cfg = load_config(params)
    record = current_record(cfg, uri)
    assert record is not None and record["mlflow_run"] == first["mlflow_run"] and record["table"] == first["table"]
    client = MlflowClient(uri)
    experiment = client.get_run(first["mlflow_run"]).info.experiment_id
    runs_before = len(client.search_runs([experiment]))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run([sys.executable, "-m", "mergeflow.cli", "run", "--params", str(params)], env=env,
                          capture_output=True, text=True, check=False, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stdout and first["mlflow_run"] in proc.stdout and first["table"] in proc.stdout
    assert "Starting temporary server" not in proc.stderr + proc.stdout  # Prefect never started
    assert len(client.search_runs([experiment])) == runs_before  # nothing new logged

    report = tmp_path / "zoo" / "report" / "report.md"
    original = report.read_bytes()
    report.write_bytes(original + b"edited by hand\n")
    assert current_record(cfg, uri) is None  # an output with other bytes
    report.write_bytes(original)
    assert current_record(cfg, uri) is not None  # the same bytes again (a new mtime, hashed afresh)
    stray = tmp_path / "zoo" / "report" / "stray.txt"
    stray.write_text("not from the run")
    assert current_record(cfg, uri) is None  # a file the run did not leave
    stray.unlink()
    assert current_record(load_config(params, {"methods.cart.scaling": 1.5}), uri) is None  # another parameter
    assert current_record(cfg, None) is None  # tracked before, not now
    client.delete_run(first["mlflow_run"])
    assert current_record(cfg, uri) is None  # its MLflow run is gone: log anew


def test_nightly_deployment_schedule_and_parameters() -> None:
    deployment = nightly_deployment("params.yaml")
    assert deployment.name == "nightly"
    assert [s.schedule.cron for s in deployment.schedules] == [NIGHTLY_CRON]
    assert deployment.parameters == {"params_file": "params.yaml"}


def test_the_flow_spreads_grid_points_over_a_dask_cluster(prefect_server, tmp_path: Path) -> None:
    """On a cluster of separate worker processes (reached by address, as a team's cluster is), every
    grid-point evaluation is a task the cluster places: one grid's points run on both workers, and the
    table equals a single-process run's. A thread rerun then finds every step cached."""
    from distributed import Client, LocalCluster, get_task_stream

    from flows.runners import task_runner

    params = _params(tmp_path / "params.yaml", cart_scaling=2.0)
    steps = ["build-zoo", "baselines", "select:weight_average", "select:cart", "adapt:adamerging"]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:  # fmt: skip
        workers = {pid: address for address, pid in client.run(os.getpid).items()}
        with get_task_stream(client) as stream:
            on_dask = pipeline(params_file=str(params), overrides={"dask_address": cluster.scheduler_address,
                                                                    "workers": 2}, track_mlflow=False)  # fmt: skip
    assert on_dask["steps"] == dict.fromkeys(steps, "Completed")
    points = [t for t in stream.data if "evaluate" in str(t["key"])]
    assert len(points) == 5  # cart's 2 × 2 grid and weight averaging's one point
    assert {t["worker"] for t in points} == set(workers.values())  # spread over both worker processes
    assert type(task_runner(2, "local")).__name__ == "DaskTaskRunner"

    serial = pipeline(params_file=str(params), overrides={"report_dir": str(tmp_path / "serial")}, track_mlflow=False)
    assert serial["steps"]["select:cart"] == "Completed" and _numbers(serial["table"]) == _numbers(on_dask["table"])
    on_threads = pipeline(params_file=str(params), track_mlflow=False)
    assert on_threads["steps"] == dict.fromkeys(steps, "Cached") and on_threads["table"] == on_dask["table"]


def _numbers(table: str) -> list[str]:
    """The table's rows without the paths of its outputs (they name the report directory)."""
    return [line for line in table.splitlines() if line.startswith("|")]
