"""The pipeline's steps as cached Prefect tasks; each body is one library call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from mergeflow.hashing import sha256_file_cached
from mergeflow.tracking import log_report
from mergeflow.zoo.build import TextZooConfig, build_text_zoo
from mergeflow.zoo.report import zoo_report
from mergeflow.zoo.text_data import source_hashes
from mergeflow.zoo.text_model import MINILM_SHA256
from tasks.caching import code_version, content_key

ZOO_CODE = ("zoo/build.py", "zoo/text_data.py", "zoo/text_model.py", "writer.py", "checkpoint.py")
REPORT_CODE = ("engine.py", "methods", "linalg.py", "selectors.py", "writer.py", "checkpoint.py", "zoo/report.py",
               "zoo/build.py", "zoo/text_model.py")  # fmt: skip


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
    files = [zoo["theta0"]["file"]] + [f for t in zoo["tasks"].values() for f in (t["model"], t["head"], t["data"])]
    return {f: sha256_file_cached(f) for f in files}


def report_cache_key(_: TaskRunContext, parameters: dict[str, Any]) -> str:
    return content_key(
        step="report", zoo=zoo_content(parameters["zoo"]), methods=parameters["methods"], grids=parameters["grids"],
        criterion=parameters["criterion"], code=code_version(*REPORT_CODE),
    )  # fmt: skip


@task(name="merge-evaluate-select", cache_key_fn=report_cache_key, persist_result=True)
def merge_and_evaluate(
    zoo: dict[str, Any], methods: dict[str, Any], grids: dict[str, Any], criterion: str, device: str, out_dir: str
) -> dict[str, Any]:
    """Every method over its grid, parameters chosen on validation, test once; table and plots."""
    zoo_dir = Path(zoo["theta0"]["file"]).parents[1]
    return zoo_report(zoo_dir, methods, grids, out_dir, criterion=criterion, device=device)


@task(name="track", cache_policy=NO_CACHE, persist_result=False)
def track(report: dict[str, Any], out_dir: str, uri: str | None = None) -> str:
    """Log the report to MLflow (a new parent run per pipeline run)."""
    return log_report(report, out_dir, uri)
