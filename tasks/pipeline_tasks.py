"""The pipeline's steps as cached Prefect tasks; each body is one library call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from mergeflow.hashing import sha256_file_cached
from mergeflow.tracking import log_report
from mergeflow.zoo.build import TextZooConfig, build_text_zoo, zoo_files
from mergeflow.zoo.report import assemble_report, evaluate_baselines, select_method
from mergeflow.zoo.text_data import source_hashes
from mergeflow.zoo.text_model import MINILM_SHA256
from tasks.caching import code_version, content_key

ZOO_CODE = ("zoo/build.py", "zoo/text_data.py", "zoo/text_model.py", "writer.py", "checkpoint.py")
EVAL_CODE = ("zoo/report.py", "zoo/build.py", "zoo/text_model.py", "checkpoint.py")
MERGE_CODE = (*EVAL_CODE, "engine.py", "methods", "linalg.py", "selectors.py", "writer.py")


def zoo_cache_key(_: TaskRunContext, parameters: dict[str, Any]) -> str:
    config = parameters["config"]
    return content_key(
        step="zoo",
        config=config,
        theta0=MINILM_SHA256,
        data=source_hashes(config["tasks"]),
        code=code_version(*ZOO_CODE),
    )


@task(name="build-zoo", cache_key_fn=zoo_cache_key, persist_result=True)
def build_zoo(directory: str, config: dict[str, Any]) -> dict[str, Any]:
    """Data manifests, zero-shot heads and fine-tunes of the text-minilm zoo."""
    return build_text_zoo(directory, TextZooConfig(**config))


def zoo_content(zoo: dict[str, Any]) -> dict[str, str]:
    """sha256 of θ0, every fine-tune, head and data manifest of a built zoo."""
    return {f: sha256_file_cached(f) for f in zoo_files(zoo)}


def zoo_dir(zoo: dict[str, Any]) -> Path:
    return Path(zoo["theta0"]["file"]).parents[1]


def baselines_cache_key(_: TaskRunContext, parameters: dict[str, Any]) -> str:
    return content_key(step="baselines", zoo=zoo_content(parameters["zoo"]), code=code_version(*EVAL_CODE))


@task(name="baselines", cache_key_fn=baselines_cache_key, persist_result=True)
def baselines(zoo: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """θ0 and every fine-tune evaluated on every task."""
    return evaluate_baselines(zoo_dir(zoo), out_dir)


def select_cache_key(_: TaskRunContext, parameters: dict[str, Any]) -> str:
    return content_key(
        step="select", zoo=zoo_content(parameters["zoo"]), method=parameters["method"], base=parameters["base"],
        grid=parameters["grid"], criterion=parameters["criterion"], code=code_version(*MERGE_CODE),
    )  # fmt: skip


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
) -> dict[str, Any]:
    """One method: merge every grid point, score on validation, test the chosen point once."""
    return select_method(zoo_dir(zoo), method, base, grid, out_dir, individual, criterion, device)


@task(name="report", cache_policy=NO_CACHE, persist_result=False)
def report(zoo: dict[str, Any], base: dict[str, Any], selections: dict[str, Any], out_dir: str, criterion: str) -> dict:
    """Assemble the table, JSON, metrics and plots (cheap: no caching)."""
    return assemble_report(zoo_dir(zoo), base, selections, out_dir, criterion)


@task(name="track", cache_policy=NO_CACHE, persist_result=False)
def track(result: dict[str, Any], out_dir: str, uri: str | None = None) -> str:
    """Log the report to MLflow (a new parent run per pipeline run)."""
    return log_report(result, out_dir, uri)
