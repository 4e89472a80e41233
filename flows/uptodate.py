"""Is the last finished run of a report directory still current? Answered without starting Prefect.

A run of the pipeline that finishes writes ``<report dir>/run-record.json``: the run key (sha256 of
the resolved configuration, the code identity of :mod:`flows.pipeline` — every module the flow can
run —, the digest of the zoo's source data, and where it was tracked), the sha256 of every file it
left in the report directory and the zoo, the results table, and its Prefect flow run and MLflow run.
The key is computed when the run *starts*, so a run whose code was edited while it ran records the
code it started with, and the next run does the work again.

``mergeflow run`` asks :func:`current_record` first: when the key is today's, every recorded file
still has its recorded bytes and the MLflow run still exists, there is nothing to compute and
nothing new to log, and it prints the recorded table instead of starting the flow (``--force``
starts it anyway; a served or worker-run deployment always runs the flow). Anything else, including
a record that cannot be read, means "not current": the flow runs, and its cached steps decide what
is recomputed.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from mergeflow.codeid import code_identity
from mergeflow.config import RunConfig
from mergeflow.errors import MergeflowError
from mergeflow.hashing import sha256_file_cached
from mergeflow.writer import write_text_atomic
from mergeflow.zoo.description import read_zoo, zoo_files
from mergeflow.zoo.registry import zoo_sources
from tasks.caching import content_key

log = logging.getLogger("mergeflow.uptodate")

RECORD = "run-record.json"
NOT_OUTPUTS = ("evaluations", "grid")  # caches and scratch inside the report directory, not results


def run_key(cfg: RunConfig, uri: str | None) -> str:
    """What a run's results are a function of (``uri``: where it is tracked, None when it is not)."""
    return content_key(
        step="pipeline",
        config=cfg.model_dump(mode="json"),
        tracking=uri,
        code=code_identity("flows.pipeline"),
        zoo_data=zoo_sources(cfg.zoo.name, cfg.zoo.settings()),
    )


def output_files(cfg: RunConfig) -> list[Path]:
    """Every file the run leaves: the report directory (but its caches and hidden files) and the zoo."""
    out_dir = cfg.report_path()
    files = [
        p
        for p in sorted(out_dir.rglob("*"))
        if p.is_file()
        and p.name != RECORD
        and not any(part.startswith(".") for part in p.relative_to(out_dir).parts)
        and p.relative_to(out_dir).parts[0] not in NOT_OUTPUTS
    ]
    return files + [Path(f) for f in zoo_files(read_zoo(cfg.zoo.dir))]


def write_record(cfg: RunConfig, key: str, table: str, flow_run_id: str | None, mlflow_run: str | None) -> Path:
    """Record a finished run (atomically; the last step of the flow, under the report lock)."""
    record = {
        "key": key,
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "flow_run_id": flow_run_id,
        "mlflow_run": mlflow_run,
        "table": table,
        "files": {str(p): sha256_file_cached(p) for p in output_files(cfg)},
    }
    return write_text_atomic(cfg.report_path() / RECORD, json.dumps(record, indent=1) + "\n")


def current_record(cfg: RunConfig, uri: str | None) -> dict[str, Any] | None:
    """The record of the last finished run if nothing it depends on changed since; else None."""
    path = cfg.report_path() / RECORD
    try:
        record = json.loads(path.read_text())
        if record["key"] != run_key(cfg, uri):
            return None
        files = record["files"]
        if {str(p) for p in output_files(cfg)} != set(files):
            return None
        if any(sha256_file_cached(p) != digest for p, digest in files.items()):
            return None
    except (OSError, ValueError, KeyError, TypeError, MergeflowError) as exc:  # no record, a torn one, files gone
        log.debug("%s: not current (%s)", path, exc)
        return None
    if uri is not None and not _mlflow_run_exists(uri, record.get("mlflow_run")):
        return None
    return record


def _mlflow_run_exists(uri: str, run_id: str | None) -> bool:
    if not run_id:
        return False
    if uri.startswith("sqlite:///"):  # the default store: one query, not MLflow's import and schema check (~6 s)
        found = _sqlite_run_stage(Path(uri.removeprefix("sqlite:///")), run_id)
        if found is not None:
            return found == "active"
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(uri).get_run(run_id).info.lifecycle_stage == "active"
    except Exception as exc:  # an unreachable server or a deleted run: run the flow (it logs anew)
        log.debug("MLflow run %s not found in %s (%s)", run_id, uri, exc)
        return False


def _sqlite_run_stage(path: Path, run_id: str) -> str | None:
    """A run's lifecycle stage in an MLflow SQLite store ("" when absent); None when the file does not
    look like one (then MLflow's own client decides)."""
    import sqlite3

    if not path.is_file():
        return ""
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT lifecycle_stage FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else ""
