"""Merged models in MLflow: each merge of a report as an MLflow 3 logged model (its files as the
model's artifacts, linked to the method's run as an output), and the report's best single merged
model registered in the Model Registry as a version of ``mergeflow-<zoo>`` with alias
``champion``.

A model's identity is the sha256 of its file, or for a per-task method (one file per task) the
fileset digest of :mod:`mergeflow.hashing` (``mergeflow-fileset-v1`` over ``NAME\\tSHA256`` lines).
A model already logged and READY in the experiment with the same identity is linked to the new
run instead of being uploaded again (a rerun served from the cache adds no copies).

The champion is the row with exactly one output (one multi-task model; per-task methods and
baselines are not candidates) of highest test score under the report's criterion (normalised
accuracy, or the mean for ``absolute``); the first such row wins a tie.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

from mergeflow.hashing import sha256_file_cached

ModelsToLog = Literal["all", "champion", "none"]
CHAMPION = "champion"
MODEL_SHA256_TAG = "mergeflow.model.sha256"
MODEL_TYPE = "mergeflow-merge"


def registered_name(zoo_name: str) -> str:
    """The Model Registry name of a zoo's champions: ``mergeflow-<zoo>`` (letters, digits, ``-``)."""
    return "mergeflow-" + (re.sub(r"[^A-Za-z0-9]+", "-", zoo_name).strip("-").lower() or "zoo")


def score_of(row: dict[str, Any], criterion: str) -> float:
    """A row's test score under the report's criterion."""
    return float(row["mean"] if criterion == "absolute" else row["normalized"])


def champion_row(report: dict[str, Any]) -> dict[str, Any] | None:
    """The best single merged model of a report (see the module docstring); None when there is none."""
    candidates = [r for r in report["rows"] if len(r.get("outputs", [])) == 1]
    if not candidates:
        return None
    return max(candidates, key=lambda r: score_of(r, report["criterion"]))  # max keeps the first of equals


def model_files(row: dict[str, Any]) -> dict[str, str]:
    """Artifact name -> sha256 of every file of a row's merged model."""
    return {Path(p).name: sha256_file_cached(p) for p in row.get("outputs", [])}


def model_identity(files: dict[str, str]) -> str:
    """The sha256 of a single file, or the fileset digest of a per-task model's files."""
    if len(files) == 1:
        return next(iter(files.values()))
    text = "mergeflow-fileset-v1\n" + "".join(f"{name}\t{files[name]}\n" for name in sorted(files))
    return hashlib.sha256(text.encode()).hexdigest()


def _existing_model(client: Any, experiment_id: str, identity: str) -> Any | None:
    """A READY logged model of the experiment whose files have the sha256 identity ``identity``."""
    from mlflow.entities import LoggedModelStatus

    found = client.search_logged_models(
        [experiment_id], filter_string=f"tags.`{MODEL_SHA256_TAG}` = '{identity}'", max_results=10
    )
    return next((m for m in found if m.status == LoggedModelStatus.READY), None)


def log_merged_model(client: Any, experiment_id: str, run_id: str, row: dict[str, Any], tags: dict[str, str]) -> Any:
    """Log (or link, when already logged) a row's merged model as an output of ``run_id``."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    files = model_files(row)
    identity = model_identity(files)
    model = _existing_model(client, experiment_id, identity)
    if model is None:
        model_tags = {**tags, "method": row["method"], MODEL_SHA256_TAG: identity,
                      **{f"file.{name}.sha256": digest for name, digest in files.items()}}  # fmt: skip
        params = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in row["params"].items()}
        model = client.create_logged_model(experiment_id, name=re.sub(r"[^A-Za-z0-9_.-]+", "_", row["method"]),
                                           source_run_id=run_id, tags=model_tags, params=params,
                                           model_type=MODEL_TYPE)  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="mergeflow-model-") as folder:
            for path in row["outputs"]:  # links: the upload reads the files where the merge wrote them
                (Path(folder) / Path(path).name).symlink_to(Path(path).resolve())
            client.log_model_artifacts(model.model_id, folder)
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
    client.set_tag(run_id, MODEL_SHA256_TAG, identity)
    return model


def register_champion(
    client: Any, zoo_name: str, row: dict[str, Any], model: Any, run_id: str, tags: dict[str, str], criterion: str
) -> Any:
    """The version of :func:`registered_name` holding ``model`` (a new one unless a version of the same
    files, method, parameters and criterion exists: a rerun that changed nothing registers nothing);
    alias ``champion`` moves to it."""
    from mlflow.exceptions import MlflowException

    name = registered_name(zoo_name)
    try:
        client.create_registered_model(
            name, description=f"Best single merged model of each mergeflow {zoo_name} report"
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version_tags = {**tags, "method": row["method"], "params": json.dumps(row["params"], sort_keys=True),
                    "model.sha256": model_identity(model_files(row)), "criterion": criterion,
                    "test.score": f"{score_of(row, criterion):.6f}"}  # fmt: skip
    same = ("model.sha256", "method", "params", "criterion")
    existing = [v for v in client.search_model_versions(f"name = '{name}'")
                if all(v.tags.get(k) == version_tags[k] for k in same)]  # fmt: skip
    if existing:
        version = max(existing, key=lambda v: int(v.version))
    else:
        version = client.create_model_version(
            name, source=f"models:/{model.model_id}", run_id=run_id, tags=version_tags, model_id=model.model_id,
            description=f"{row['method']} with {json.dumps(row['params'], sort_keys=True)}",
        )  # fmt: skip
    client.set_registered_model_alias(name, CHAMPION, version.version)
    return version
