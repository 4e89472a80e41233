"""The pipeline's steps as cached Prefect tasks; each body is one library call.

Task runs are named for what they do (``select:cart``, ``adapt:adamerging``,
``evaluate:cart[λ=2, k=0.12]``). Steps whose failures can be transient (building a zoo fetches
and writes files; tracking talks to MLflow) are retried with exponential backoff, but only on
I/O-like errors (:func:`is_transient`): a bad input fails at once. The merge and evaluation math
is deterministic and never retried.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.context import TaskRunContext
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import Task, exponential_backoff

from mergeflow.adamerging import AdaMergingParams
from mergeflow.codeid import code_identity
from mergeflow.errors import MergeflowError
from mergeflow.hashing import sha256_file_cached
from mergeflow.tracking import TrackingContext, log_report
from mergeflow.zoo.adapt import adapt_zoo
from mergeflow.zoo.description import zoo_files
from mergeflow.zoo.registry import build_zoo as build_named_zoo
from mergeflow.zoo.registry import zoo_sources
from mergeflow.zoo.report import assemble_report
from mergeflow.zoo.selection import Halving, evaluate_baselines, evaluate_grid_point, select_method
from mergeflow.zoo.text_model import MINILM_SHA256
from tasks.caching import content_key
from tasks.logs import send_library_logs_to_prefect

send_library_logs_to_prefect()  # here, so every process that runs these tasks (Dask workers too) sends them

RETRIES = 3
BACKOFF_S = 5.0  # then 10 s, 20 s
TRANSIENT_MODULES = ("mlflow", "httpx", "httpcore", "requests", "urllib3", "huggingface_hub", "aiohttp")


def is_transient(exc: BaseException) -> bool:
    """A failure worth retrying: the OS, the network or a tracking server, not bad input or a bug."""
    if isinstance(exc, MergeflowError):
        return False
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in TRANSIENT_MODULES


def retry_transient(_: Task[..., Any], __: TaskRun, state: State[Any]) -> bool:
    """Prefect's retry condition: retry a failed run only when :func:`is_transient` says so."""
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


def code_of(function: Callable[..., Any]) -> str:
    """The code identity of a library function: its module and everything that module imports."""
    return code_identity(function.__module__)


def zoo_cache_key(_: TaskRunContext, parameters: dict[str, Any]) -> str:
    name, config = parameters["name"], parameters["config"]
    return content_key(
        step="zoo",
        name=name,
        directory=parameters["directory"],
        config=config,
        theta0={"text-minilm": MINILM_SHA256, "clip": "acquired: sha256 pinned by the store"}.get(name, "trained here"),
        data=zoo_sources(name, config),
        code=code_of(build_named_zoo),
    )


@task(
    name="build-zoo", task_run_name="build-zoo:{name}", cache_key_fn=zoo_cache_key, persist_result=True,
    retries=RETRIES, retry_delay_seconds=exponential_backoff(BACKOFF_S), retry_condition_fn=retry_transient,
)  # fmt: skip
def build_zoo(directory: str, config: dict[str, Any], name: str = "text-minilm") -> dict[str, Any]:
    """Data, heads and fine-tunes of the configured zoo (text-minilm or vision-tiny)."""
    return build_named_zoo(name, directory, config)


def zoo_content(zoo: dict[str, Any]) -> dict[str, str]:
    """sha256 of θ0, every fine-tune, head and data manifest of a built zoo."""
    return {f: sha256_file_cached(f) for f in zoo_files(zoo)}


def zoo_dir(zoo: dict[str, Any]) -> Path:
    return Path(zoo["dir"]) if "dir" in zoo else Path(zoo["theta0"]["file"]).parents[1]


def baselines_cache_key(_: TaskRunContext, parameters: dict[str, Any]) -> str:
    return content_key(
        step="baselines",
        zoo=zoo_content(parameters["zoo"]),
        out=parameters["out_dir"],
        code=code_of(evaluate_baselines),
    )


@task(name="baselines", task_run_name="baselines", cache_key_fn=baselines_cache_key, persist_result=True)
def baselines(zoo: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """θ0 and every fine-tune evaluated on every task."""
    return evaluate_baselines(zoo_dir(zoo), out_dir)


def select_cache_key(_: TaskRunContext, parameters: dict[str, Any]) -> str:
    return content_key(
        step="select", zoo=zoo_content(parameters["zoo"]), method=parameters["method"], base=parameters["base"],
        grid=parameters["grid"], criterion=parameters["criterion"], halving=parameters.get("halving"),
        out=parameters["out_dir"],
        code=code_of(select_method),
    )  # fmt: skip


@task(name="evaluate-point", cache_policy=NO_CACHE, persist_result=False)
def evaluate_point(job: list[Any]) -> list[dict[str, dict[str, float]]]:
    """One grid point A + λ·D on validation (the library caches it by content)."""
    return evaluate_grid_point(*job)


def dask_scheduler() -> str | None:
    """The scheduler address when this code runs inside a Dask worker (a task the cluster placed), else None."""
    try:
        from distributed import get_worker
    except ImportError:
        return None
    try:
        return str(get_worker().scheduler.address)
    except ValueError:  # not in a worker
        return None


def point_tasks(workers: int) -> Callable[[Callable[..., Any], list[tuple[Any, ...]], list[str]], list[Any]]:
    """Evaluate grid points as Prefect tasks named ``evaluate:<label>``.

    Inside a Dask worker (the flow runs on a cluster) every point is submitted to the cluster, which
    places it on any worker; the ``select`` task waiting for them leaves its worker slot meanwhile
    (``secede``/``rejoin``), so a cluster of any size cannot deadlock on its own children. Otherwise
    ``workers`` threads here, on a runner of their own (a child submitted to the parent's busy
    runner would wait forever for a free worker)."""

    def submit(runner: Any, job: tuple[Any, ...], label: str) -> Any:
        return runner.submit(evaluate_point.with_options(task_run_name=f"evaluate:{label}"), {"job": list(job)})

    def on_cluster(jobs: list[tuple[Any, ...]], labels: list[str], address: str) -> list[Any]:
        from distributed import rejoin, secede
        from prefect_dask import DaskTaskRunner

        with DaskTaskRunner(address=address) as runner:
            futures = [submit(runner, job, label) for job, label in zip(jobs, labels, strict=True)]
            secede()
            try:
                return [future.result() for future in futures]
            finally:
                rejoin()

    def run(_: Callable[..., Any], jobs: list[tuple[Any, ...]], labels: list[str]) -> list[Any]:
        address = dask_scheduler()
        if address:
            return on_cluster(jobs, labels, address)
        with ThreadPoolTaskRunner(max_workers=max(1, workers)) as runner:
            # the first point runs alone: it loads the evaluator (imports, model) before threads share it
            # (concurrent first imports of transformers in one fresh process fail with ImportError)
            first = [submit(runner, jobs[0], labels[0]).result()] if jobs else []
            futures = [submit(runner, job, label) for job, label in zip(jobs[1:], labels[1:], strict=True)]
            return first + [future.result() for future in futures]

    return run


@task(name="select", task_run_name="select:{method}", cache_key_fn=select_cache_key, persist_result=True)
def select(
    zoo: dict[str, Any],
    method: str,
    base: dict[str, Any],
    grid: dict[str, Any],
    criterion: str,
    device: str,
    out_dir: str,
    individual: dict[str, Any],
    workers: int = 1,
    halving: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One method: a grid basis from one merge pass, grid points scored on validation (each point and
    fold a task; ``halving`` None: every point on the whole split), the chosen point merged exactly and
    tested once."""
    return select_method(
        zoo_dir(zoo),
        method,
        base,
        grid,
        out_dir,
        individual,
        criterion,
        device,
        map_points=point_tasks(workers),
        halving=None if halving is None else Halving(**halving),
    )


def adapt_cache_key(_: TaskRunContext, parameters: dict[str, Any]) -> str:
    return content_key(
        step="adapt", zoo=zoo_content(parameters["zoo"]), name=parameters["name"], params=parameters["params"],
        out=parameters["out_dir"], code=code_of(adapt_zoo),
    )  # fmt: skip


@task(name="adapt", task_run_name="adapt:{name}", cache_key_fn=adapt_cache_key, persist_result=True)
def adapt(zoo: dict[str, Any], name: str, params: dict[str, Any], out_dir: str, device: str = "auto") -> dict[str, Any]:
    """AdaMerging: coefficients learned on unlabelled test batches (GPU when present), then evaluated."""
    return adapt_zoo(zoo_dir(zoo), name, AdaMergingParams(**params), out_dir, device)


@task(name="report", task_run_name="report", cache_policy=NO_CACHE, persist_result=False)
def report(zoo: dict[str, Any], base: dict[str, Any], selections: dict[str, Any], out_dir: str, criterion: str) -> dict:
    """Assemble the table, JSON, metrics and plots (cheap: no caching)."""
    return assemble_report(zoo_dir(zoo), base, selections, out_dir, criterion)


@task(
    name="track", task_run_name="track:mlflow", cache_policy=NO_CACHE, persist_result=False,
    retries=RETRIES, retry_delay_seconds=exponential_backoff(BACKOFF_S), retry_condition_fn=retry_transient,
)  # fmt: skip
def track(result: dict[str, Any], out_dir: str, uri: str | None = None, context: TrackingContext | None = None) -> str:
    """Log the report to MLflow (a new parent run per pipeline run; ``context``: what the flow knows)."""
    return log_report(result, out_dir, uri, context)
