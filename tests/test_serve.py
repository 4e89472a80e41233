"""``mergeflow serve`` against a real ``prefect server start`` on 127.0.0.1 (a free port, its own
PREFECT_HOME and SQLite database, stopped at the end): the refusal without a server, a scheduled
run that comes due within seconds and completes with the expected report, two overlapping runs
on one report directory held apart by the concurrency limit, task runs named for what they do,
and the results artifact with the MLflow run."""

from __future__ import annotations

import contextvars
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml
from servers import free_port, healthy, stop, wait_for

from mergeflow.errors import MergeflowError

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEPLOYMENT = "mergeflow-pipeline/served-test"


def _env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without any Prefect setting, a fresh PREFECT_HOME, no telemetry."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "MLFLOW_ENABLE_TELEMETRY": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT), os.environ.get("PYTHONPATH", "")) if p),
    }
    return env | extra


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prefect server; yields its API URL."""
    import sqlalchemy

    assert tuple(map(int, sqlalchemy.__version__.split(".")[:2])) < (2, 1), (
        f"SQLAlchemy {sqlalchemy.__version__}: prefect 3.8.8's scheduler needs < 2.1 (pyproject.toml pins it; "
        "rerun scripts/setup.sh)"
    )
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = _env(
        home / "home",
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS="1",
    )
    with (home / "server.log").open("wb") as logfile:
        process = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, cwd=home, stdout=logfile, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_for(lambda: healthy(url), 120, "prefect server /api/health", process)
            yield url
        finally:
            stop(process)


@pytest.fixture
def api(server: str) -> Iterator[Any]:
    """A client of the test server (this process's settings pointed at it)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server}), get_client(sync_client=True) as client:
        yield client


def _params(path: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "device": "cpu",
                "zoo": {
                    "dir": str(path.parent / "zoo"),
                    "text_minilm": {"tasks": ["language", "emoji"], "train": 32, "validation": 16, "test": 32,
                                    "layers": 2, "max_length": 32},
                },
                "methods": {"weight_average": {}, "cart": {"scaling": 2.0}},
                "selection": {"grids": {"cart": {"rank_ratio": [0.25, 1.0], "scaling": [1.0, 2.0]}}},
                "adaptation": {"adamerging": {"steps": 2, "batch_size": 4}},
            }
        )
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def served(server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``mergeflow serve`` of the tiny pipeline every hour, its first run 10 s after serving starts,
    and, as soon as the deployment exists, a second run of it started by hand on the same report
    directory; yields once both have finished."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    work = tmp_path_factory.mktemp("served")
    params = _params(work / "params.yaml")
    mlflow_db = work / "mlflow.db"
    env = _env(
        work / "home",
        PREFECT_API_URL=server,
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        MLFLOW_TRACKING_URI=f"sqlite:///{mlflow_db}",
    )
    command = [str(BIN / "mergeflow"), "serve", "--params", str(params), "--interval", "3600",
               "--set", "selection.criterion=absolute", "--name", "served-test"]  # fmt: skip
    with (work / "serve.log").open("wb") as logfile:
        process = subprocess.Popen(command, env=env, cwd=work, stdout=logfile, stderr=subprocess.STDOUT)
        try:
            with temporary_settings({PREFECT_API_URL: server}), get_client(sync_client=True) as client:

                def deployment() -> Any:
                    try:
                        return client.read_deployment_by_name(DEPLOYMENT)
                    except Exception:  # not registered yet
                        return None

                wait_for(deployment, 120, "the served deployment", process)
                by_hand = run_deployment(DEPLOYMENT, timeout=0)

                def finished() -> dict[str, Any] | None:
                    runs = {r.id: r for r in client.read_flow_runs()}
                    scheduled = [r for r in runs.values() if r.auto_scheduled and r.state and r.state.is_final()]
                    ours = runs[by_hand.id]
                    return {"scheduled": scheduled[0], "by_hand": ours} if scheduled and ours.state.is_final() else None

                runs = wait_for(finished, 300, "the scheduled run and the run started by hand", process)
            yield {**runs, "process": process, "params": params, "work": work, "mlflow": mlflow_db}
        finally:
            stop(process)


def test_serve_refuses_the_ephemeral_api_with_one_line(tmp_path: Path) -> None:
    """Without PREFECT_API_URL (and with one that does not answer): exit 2 and one line saying what to do."""
    down = f"http://127.0.0.1:{free_port()}/api"

    def serve(name: str, **extra: str) -> subprocess.Popen[str]:
        env, pipe = _env(tmp_path / name, **extra), subprocess.PIPE
        return subprocess.Popen(
            [str(BIN / "mergeflow"), "serve"], env=env, cwd=tmp_path, stdout=pipe, stderr=pipe, text=True
        )

    runs = [serve("unset"), serve("down", PREFECT_API_URL=down)]  # at once: each imports torch and Prefect
    (unset_err, unset), (refused_err, refused) = [(p.communicate(timeout=120)[1], p.returncode) for p in runs]
    assert unset == refused == 2
    assert len(unset_err.strip().splitlines()) == 1, unset_err
    assert unset_err.startswith("mergeflow: error: mergeflow serve needs a Prefect server")
    assert "prefect server start" in unset_err and "PREFECT_API_URL=http://127.0.0.1:4200/api" in unset_err
    assert refused_err.strip().splitlines() == [
        f"mergeflow: error: Prefect API at {down} does not answer (ConnectError): is the server up?"
    ]


def test_serve_refuses_a_bad_schedule_in_one_line(server: str, tmp_path: Path) -> None:
    params = _params(tmp_path / "params.yaml")
    env, pipe = _env(tmp_path / "home", PREFECT_API_URL=server), subprocess.PIPE
    runs = [
        subprocess.Popen(
            [str(BIN / "mergeflow"), "serve", "--params", str(params), *schedule],
            env=env,
            cwd=tmp_path,
            stdout=pipe,
            stderr=pipe,
            text=True,
        )
        for schedule in (["--cron", "every night"], ["--interval", "-5"])
    ]
    (cron_err, cron), (interval_err, interval) = [(p.communicate(timeout=120)[1], p.returncode) for p in runs]
    assert cron == interval == 2
    assert cron_err.strip().splitlines() == [
        "mergeflow: error: --cron 'every night': not a valid schedule (Invalid cron string: \"every night\")"
    ]
    assert interval_err.strip().splitlines() == [
        "mergeflow: error: --interval -5: expected a positive number of seconds"
    ]


def test_the_scheduled_run_is_picked_up_and_completes(served: dict[str, Any], api: Any) -> None:
    run = served["scheduled"]
    assert run.state.is_completed(), run.state
    assert run.auto_scheduled and run.deployment_id is not None
    deployment = api.read_deployment(run.deployment_id)
    assert deployment.name == "served-test" and deployment.parameters["overrides"] == {
        "selection.criterion": "absolute"
    }
    assert run.parameters["overrides"] == {"selection.criterion": "absolute"}  # carried by the deployment
    results = json.loads((served["work"] / "zoo" / "report" / "results.json").read_text())
    assert results["criterion"] == "absolute"
    assert {row["method"] for row in results["rows"]} >= {"weight_average", "cart", "adamerging"}


def _task_runs(api: Any, flow_run_id: UUID) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return api.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def test_task_runs_are_named_for_what_they_do(served: dict[str, Any], api: Any) -> None:
    """(the run that got the report directory first computed the grid; the other found it cached)"""
    names = {t.name for key in ("scheduled", "by_hand") for t in _task_runs(api, served[key].id)}
    steps = {"build-zoo:text-minilm", "baselines", "select:weight_average", "select:cart", "adapt:adamerging"}
    assert steps | {"report", "track:mlflow"} <= names
    assert {f"evaluate:cart[λ={s}, k={k}]" for s in (1, 2) for k in (0.25, 1)} <= names
    assert "evaluate:weight_average" in names


def test_the_results_table_is_an_artifact_with_the_mlflow_run(served: dict[str, Any], api: Any) -> None:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    artifacts = api.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[served["scheduled"].id]))
    )
    (artifact,) = [a for a in artifacts if a.type == "markdown"]
    assert artifact.key.startswith("mergeflow-text-minilm-report-")
    table = (served["work"] / "zoo" / "report" / "report.md").read_text()
    assert "| cart |" in artifact.data and "| weight_average |" in artifact.data
    assert all(line in table for line in artifact.data.splitlines() if line.startswith("| cart |"))
    run_id = re.search(r"MLflow run: `([0-9a-f]{32})`", artifact.data).group(1)
    with sqlite3.connect(served["mlflow"]) as db:  # the MLflow store itself (no MLflow import: seconds saved)
        assert db.execute("SELECT status FROM runs WHERE run_uuid = ?", (run_id,)).fetchall() == [("FINISHED",)]


def test_overlapping_runs_on_one_report_directory_never_interleave(served: dict[str, Any], api: Any) -> None:
    """The scheduled run and the run started by hand overlapped on one report directory: the one
    that came second waited for the concurrency limit, so every task run of it was created after
    the last task run of the first had ended."""
    runs = [api.read_flow_run(served[key].id) for key in ("scheduled", "by_hand")]
    assert all(r.state.is_completed() for r in runs), [r.state for r in runs]
    tasks = {r.id: _task_runs(api, r.id) for r in runs}
    first, second = sorted(runs, key=lambda r: min(t.created for t in tasks[r.id]))
    first_done = max(t.end_time or t.state.timestamp for t in tasks[first.id])
    assert min(t.created for t in tasks[second.id]) >= first_done  # nothing of the second while the first wrote
    assert second.start_time < first.end_time  # they did overlap: the second was running, held by the limit
    assert {t.name for t in tasks[first.id]} >= {"select:cart", "track:mlflow"}
    assert {t.name for t in tasks[second.id]} >= {"select:cart", "track:mlflow"}


def test_the_report_directory_limit_times_out_with_one_line(server: str, tmp_path: Path) -> None:
    """The server's concurrency limit of one report directory: a second holder waits, then gives up."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.locks import api_is_ephemeral, limit_name, server_limit

    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with server_limit(tmp_path / "report", 30):
            held.set()
            release.wait(30)

    with temporary_settings({PREFECT_API_URL: server}):
        assert not api_is_ephemeral()
        holder = threading.Thread(target=contextvars.copy_context().run, args=(hold,))
        holder.start()
        try:
            assert held.wait(30)
            with pytest.raises(MergeflowError) as refused, server_limit(tmp_path / "." / "report", 1.0):
                pass
        finally:
            release.set()
            holder.join()
        with server_limit(tmp_path / "report", 5.0):  # free again
            pass
    message = str(refused.value)
    assert "\n" not in message and limit_name(tmp_path / "report") in message and "gave up after" in message


def test_local_runs_exclude_each_other_with_a_file_lock(tmp_path: Path) -> None:
    """On the ephemeral API (no server) the report directory's lock is the file lock alone."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.locks import LOCK_FILE, api_is_ephemeral, file_lock, report_lock

    events: list[tuple[str, float]] = []

    def first() -> None:
        with report_lock(tmp_path, 10):
            events.append(("first in", time.monotonic()))
            time.sleep(1.0)
            events.append(("first out", time.monotonic()))

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert api_is_ephemeral()
        thread = threading.Thread(target=contextvars.copy_context().run, args=(first,))
        thread.start()
        wait_for(lambda: events, 10, "the first holder")
        with pytest.raises(MergeflowError, match="gave up after"), file_lock(tmp_path, 0.2):
            pass
        with report_lock(tmp_path, 10):  # waits for the first
            events.append(("second in", time.monotonic()))
        thread.join()
    assert [e[0] for e in events] == ["first in", "first out", "second in"]
    assert (tmp_path / LOCK_FILE).exists()


def test_a_deployment_carries_preset_overrides_and_schedule() -> None:
    from datetime import UTC, datetime

    from flows.pipeline import INTERVAL_LEAD_S, nightly_deployment

    nightly = nightly_deployment("p.yaml", "quick", {"workers": 2, "x.grid": (1, 2)}, cron="30 1 * * *")
    assert nightly.name == "nightly" and nightly.entrypoint == "flows.pipeline.pipeline"
    assert nightly.parameters == {
        "params_file": "p.yaml",
        "preset": "quick",
        "overrides": {"workers": 2, "x.grid": [1, 2]},
    }
    assert [s.schedule.cron for s in nightly.schedules] == ["30 1 * * *"]
    before = datetime.now(UTC)
    (hourly,) = nightly_deployment("p.yaml", interval_s=3600, name="hourly").schedules
    assert hourly.schedule.interval.total_seconds() == 3600
    lead = (hourly.schedule.anchor_date - before).total_seconds()
    assert INTERVAL_LEAD_S - 1 <= lead <= INTERVAL_LEAD_S + 5


def test_the_artifact_text() -> None:
    from flows.pipeline import artifact_key, mlflow_run_url, report_markdown

    table = "| model | mean |\n|---|---|\n| cart | 80.0 |"
    text = report_markdown(table, {"select:cart": "Cached"}, "ab" * 16, "sqlite:///m.db", None)
    assert table in text and "MLflow run: `" + "ab" * 16 + "` in `sqlite:///m.db`" in text
    assert "| select:cart | Cached |" in text
    linked = report_markdown(table, {}, "r1", "http://mlflow:5000", "http://mlflow:5000/#/experiments/1/runs/r1")
    assert "MLflow run: [r1](http://mlflow:5000/#/experiments/1/runs/r1)" in linked
    assert "not tracked" in report_markdown(table, {}, None, None, None)
    assert mlflow_run_url("sqlite:///m.db", "r1") is None
    assert re.fullmatch(r"[a-z0-9-]+", artifact_key("Text MiniLM", "out/zoo/report"))
    assert artifact_key("clip", "out/zoo/report") == artifact_key("clip", "out/zoo/./report")


def test_only_transient_failures_of_io_steps_are_retried() -> None:
    from mergeflow.errors import CheckpointError
    from tasks import pipeline_tasks as steps

    assert steps.is_transient(OSError("disk")) and steps.is_transient(ConnectionResetError())
    assert not steps.is_transient(CheckpointError("bad file")) and not steps.is_transient(ValueError("bug"))
    mlflow_error = type("MlflowException", (Exception,), {"__module__": "mlflow.exceptions"})
    assert steps.is_transient(mlflow_error("server said 503"))
    assert steps.build_zoo.retries == steps.track.retries == steps.RETRIES > 0
    assert steps.build_zoo.retry_delay_seconds == [5.0, 10.0, 20.0]
    assert all(t.retries == 0 for t in (steps.select, steps.adapt, steps.evaluate_point, steps.baselines, steps.report))


def test_a_worker_runs_the_work_pool_deployment(server: str, api: Any, tmp_path: Path) -> None:
    """``prefect.yaml`` as the README says: a process work pool, ``prefect deploy`` of its deployment
    (parameters and pool overridden), a run started by hand, and a worker started elsewhere that finds
    the checkout through MERGEFLOW_CHECKOUT, runs the flow there and completes it."""
    from prefect.deployments import run_deployment

    params = _params(tmp_path / "params.yaml")
    env = _env(tmp_path / "home", PREFECT_API_URL=server, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    pool = "mergeflow-worker-test"

    def prefect(*args: str, cwd: Path = PROJECT, **extra: str) -> str:
        done = subprocess.run([str(BIN / "prefect"), *args], env=env | extra, cwd=cwd, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    before = {p.name for p in PROJECT.iterdir()}
    prefect("work-pool", "create", pool, "--type", "process")
    prefect("--no-prompt", "deploy", "--name", "nightly-pool", "--pool", pool,
            "--params", json.dumps({"params_file": str(params)}))  # fmt: skip
    assert {p.name for p in PROJECT.iterdir()} == before  # deploying wrote nothing into the checkout
    deployment = api.read_deployment_by_name("mergeflow-pipeline/nightly-pool")
    assert deployment.work_pool_name == pool and [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $MERGEFLOW_CHECKOUT }}"}}
    ]  # resolved by the worker, on its machine
    run = run_deployment("mergeflow-pipeline/nightly-pool", timeout=0)
    elsewhere = tmp_path / "worker"
    elsewhere.mkdir()
    prefect("worker", "start", "--pool", pool, "--run-once", cwd=elsewhere, MERGEFLOW_CHECKOUT=str(PROJECT))
    finished = api.read_flow_run(run.id)
    assert finished.state.is_completed(), finished.state
    results = json.loads((tmp_path / "zoo" / "report" / "results.json").read_text())
    assert {row["method"] for row in results["rows"]} >= {"weight_average", "cart", "adamerging"}
    from flows.pipeline import artifact_key

    assert artifact_key("text-minilm", tmp_path / "zoo" / "report") in {a.key for a in api.read_artifacts()}


def test_the_library_log_lines_are_in_the_run_logs(served: dict[str, Any], api: Any) -> None:
    """mergeflow's own log records reach the Prefect runs' logs: the flow's line in both runs, and
    lines from inside tasks in the run that computed them (whichever of the two got the report
    directory first; the other found every step cached)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    runs = [served["scheduled"].id, served["by_hand"].id]
    logs = api.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=runs)))
    library = [log for log in logs if log.name.startswith("mergeflow")]
    assert {log.flow_run_id for log in library if log.name == "mergeflow.pipeline"} == set(runs)
    from_tasks = {log.name for log in library if log.task_run_id is not None}
    assert {"mergeflow.selection", "mergeflow.engine"} <= from_tasks, from_tasks
