"""The Prefect pipeline: content-keyed caching of its steps, MLflow runs, the nightly deployment."""

from __future__ import annotations

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


def test_nightly_deployment_schedule_and_parameters() -> None:
    deployment = nightly_deployment("params.yaml")
    assert deployment.name == "nightly"
    assert [s.schedule.cron for s in deployment.schedules] == [NIGHTLY_CRON]
    assert deployment.parameters == {"params_file": "params.yaml"}


def test_the_flow_runs_on_a_local_dask_cluster(prefect_server, tmp_path: Path) -> None:
    """The same flow through prefect-dask (worker processes), chosen by the configuration alone (the flow
    builds its task runner from ``dask_address`` and ``workers``); a thread rerun then finds every step cached."""
    from flows.runners import task_runner

    params = _params(tmp_path / "params.yaml", cart_scaling=2.0)
    steps = ["build-zoo", "baselines", "select:weight_average", "select:cart", "adapt:adamerging"]
    dask = {"dask_address": "local", "workers": 2}
    on_dask = pipeline(params_file=str(params), overrides=dask, track_mlflow=False)
    assert on_dask["steps"] == dict.fromkeys(steps, "Completed")
    assert type(task_runner(2, "local")).__name__ == "DaskTaskRunner"
    on_threads = pipeline(params_file=str(params), track_mlflow=False)
    assert on_threads["steps"] == dict.fromkeys(steps, "Cached") and on_threads["table"] == on_dask["table"]
