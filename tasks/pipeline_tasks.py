"""The pipeline's steps as cached Prefect tasks; each body is one library call."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.task_runners import ThreadPoolTaskRunner

from mergeflow.adamerging import AdaMergingParams
from mergeflow.codeid import code_identity
from mergeflow.hashing import sha256_file_cached
from mergeflow.tracking import log_report
from mergeflow.zoo.adapt import adapt_zoo
from mergeflow.zoo.build import zoo_files
from mergeflow.zoo.registry import build_zoo as build_named_zoo
from mergeflow.zoo.registry import zoo_sources
from mergeflow.zoo.report import assemble_report
from mergeflow.zoo.selection import evaluate_baselines, evaluate_grid_point, select_method
from mergeflow.zoo.text_model import MINILM_SHA256
from tasks.caching import content_key


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


@task(name="build-zoo", cache_key_fn=zoo_cache_key, persist_result=True)
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


@task(name="baselines", cache_key_fn=baselines_cache_key, persist_result=True)
def baselines(zoo: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """θ0 and every fine-tune evaluated on every task."""
    return evaluate_baselines(zoo_dir(zoo), out_dir)


def select_cache_key(_: TaskRunContext, parameters: dict[str, Any]) -> str:
    return content_key(
        step="select", zoo=zoo_content(parameters["zoo"]), method=parameters["method"], base=parameters["base"],
        grid=parameters["grid"], criterion=parameters["criterion"], out=parameters["out_dir"],
        code=code_of(select_method),
    )  # fmt: skip


@task(name="evaluate-point", cache_policy=NO_CACHE, persist_result=False)
def evaluate_point(job: list[Any]) -> list[dict[str, dict[str, float]]]:
    """One grid point A + λ·D on validation (the library caches it by content)."""
    return evaluate_grid_point(*job)


def point_tasks(workers: int) -> Callable[[Callable[..., Any], list[tuple[Any, ...]]], list[Any]]:
    """Evaluate grid points as Prefect tasks, ``workers`` at a time, on a runner of their own (a
    child submitted to the parent's busy runner would wait forever for a free worker)."""

    def run(_: Callable[..., Any], jobs: list[tuple[Any, ...]]) -> list[Any]:
        with ThreadPoolTaskRunner(max_workers=max(1, workers)) as runner:
            futures = [runner.submit(evaluate_point, parameters={"job": list(job)}) for job in jobs]
            return [future.result() for future in futures]

    return run


@task(name="select", cache_key_fn=select_cache_key, persist_result=True)
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
) -> dict[str, Any]:
    """One method: a grid basis from one merge pass, every point scored on validation as a task,
    the chosen point merged exactly and tested once."""
    return select_method(
        zoo_dir(zoo), method, base, grid, out_dir, individual, criterion, device, map_points=point_tasks(workers)
    )


def adapt_cache_key(_: TaskRunContext, parameters: dict[str, Any]) -> str:
    return content_key(
        step="adapt", zoo=zoo_content(parameters["zoo"]), name=parameters["name"], params=parameters["params"],
        out=parameters["out_dir"], code=code_of(adapt_zoo),
    )  # fmt: skip


@task(name="adapt", cache_key_fn=adapt_cache_key, persist_result=True)
def adapt(zoo: dict[str, Any], name: str, params: dict[str, Any], out_dir: str, device: str = "auto") -> dict[str, Any]:
    """AdaMerging: coefficients learned on unlabelled test batches (GPU when present), then evaluated."""
    return adapt_zoo(zoo_dir(zoo), name, AdaMergingParams(**params), out_dir, device)


@task(name="report", cache_policy=NO_CACHE, persist_result=False)
def report(zoo: dict[str, Any], base: dict[str, Any], selections: dict[str, Any], out_dir: str, criterion: str) -> dict:
    """Assemble the table, JSON, metrics and plots (cheap: no caching)."""
    return assemble_report(zoo_dir(zoo), base, selections, out_dir, criterion)


@task(name="track", cache_policy=NO_CACHE, persist_result=False)
def track(result: dict[str, Any], out_dir: str, uri: str | None = None) -> str:
    """Log the report to MLflow (a new parent run per pipeline run)."""
    return log_report(result, out_dir, uri)
