"""Lineage of a tracked run: which code and which files produced its numbers.

Code: the mergeflow version, and the git commit of the checkout the library was imported from
with a dirty flag (``git status --porcelain`` prints anything: modified, staged or untracked files).
Files: θ0, every fine-tune, head and data file of the zoo, each identified by the sha256 of its
bytes as read now (the stat-keyed cache of :mod:`mergeflow.hashing`), never by a hash copied from
elsewhere. A data manifest holding ``splits`` (text and CLIP zoos) also yields one input per
split, identified by ``sha256(json.dumps(split, sort_keys=True, ensure_ascii=False))`` (UTF-8).

MLflow stores dataset digests of at most 36 characters, so an input's MLflow digest is the first
36 hex digits of its sha256; the full sha256 is in the dataset's profile and in the run's tags.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mergeflow
from mergeflow.hashing import sha256_file_cached

MLFLOW_DIGEST_CHARS = 36  # the length of MLflow's dataset digest column


@dataclass(frozen=True)
class InputFile:
    """One input of a run: a file (or one split of a data file) and the sha256 that identifies it."""

    name: str
    context: str  # pretrained | fine-tune | data | train | validation | test
    path: str
    sha256: str
    profile: dict[str, Any]


def git_state(directory: str | Path | None = None) -> tuple[str, bool | None]:
    """``(commit, dirty)`` of the git checkout holding ``directory`` (default: the mergeflow package);
    ``("unknown", None)`` outside a checkout or without git."""
    where = Path(directory) if directory is not None else Path(mergeflow.__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=False, timeout=10)  # fmt: skip
        if head.returncode != 0 or not head.stdout.strip():
            return "unknown", None
        status = subprocess.run(["git", "-C", str(where), "status", "--porcelain"], capture_output=True, text=True,
                                check=False, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", None
    return head.stdout.strip(), (bool(status.stdout.strip()) if status.returncode == 0 else None)


def code_tags() -> dict[str, str]:
    """The version and git state of the code that ran (``git.dirty``: true, false or unknown)."""
    commit, dirty = git_state()
    tags = {"mergeflow.version": mergeflow.__version__, "git.commit": commit,
            "git.dirty": "unknown" if dirty is None else str(dirty).lower()}  # fmt: skip
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit  # MLflow's own column for the source version
    return tags


def _split_inputs(task: str, path: Path) -> list[InputFile]:
    """One input per split of a JSON data manifest with ``splits`` (none for other data files)."""
    if path.suffix != ".json":
        return []
    try:
        splits = json.loads(path.read_text()).get("splits")
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(splits, dict):
        return []
    inputs = []
    for split, body in splits.items():
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        size = next((len(body[k]) for k in ("labels", "indices") if isinstance(body, dict) and k in body), None)
        profile = {"sha256": digest, "task": task, "split": split, "examples": size}
        inputs.append(InputFile(f"{task}/{split}", split, str(path), digest, profile))
    return inputs


def zoo_inputs(zoo: dict[str, Any]) -> list[InputFile]:
    """θ0, every fine-tune and every data file (and its splits) of a zoo, hashed from the files."""

    def file_input(name: str, context: str, path: str, **extra: Any) -> InputFile:
        digest = sha256_file_cached(path)
        return InputFile(name, context, str(path), digest, {"sha256": digest, "bytes": Path(path).stat().st_size,
                                                            **extra})  # fmt: skip

    inputs = [file_input("theta0", "pretrained", zoo["theta0"]["file"])]
    for task, info in zoo["tasks"].items():
        inputs.append(file_input(f"finetuned/{task}", "fine-tune", info["model"], task=task))
    for task, info in zoo["tasks"].items():
        inputs.append(file_input(f"data/{task}", "data", info["data"], task=task))
        inputs.extend(_split_inputs(task, Path(info["data"])))
    return inputs


def lineage_tags(zoo: dict[str, Any], inputs: list[InputFile]) -> dict[str, str]:
    """Run tags: code state, zoo name, and the sha256 of every input file and head."""
    by_name = {i.name: i for i in inputs}
    tags = {**code_tags(), "zoo.name": zoo.get("name", "unknown"), "theta0.sha256": by_name["theta0"].sha256}
    for task, info in zoo["tasks"].items():
        tags[f"finetuned.{task}.sha256"] = by_name[f"finetuned/{task}"].sha256
        tags[f"data.{task}.sha256"] = by_name[f"data/{task}"].sha256
        tags[f"head.{task}.sha256"] = sha256_file_cached(info["head"])
    if "text" in zoo:  # clip zoos: the text tower the zero-shot heads were built from
        text = zoo["text"]
        tags["text_tower.sha256"] = (
            sha256_file_cached(text["file"]) if Path(text.get("file", "")).is_file() else text["sha256"]
        )
    return tags


def mlflow_dataset_inputs(inputs: list[InputFile]) -> list[Any]:
    """The inputs as MLflow dataset inputs (``mlflow.data.context`` tag: the input's role)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    return [
        DatasetInput(
            Dataset(name=i.name, digest=i.sha256[:MLFLOW_DIGEST_CHARS], source_type="local",
                    source=json.dumps({"uri": str(Path(i.path).resolve())}), profile=json.dumps(i.profile)),
            tags=[InputTag("mlflow.data.context", i.context)],
        )
        for i in inputs
    ]  # fmt: skip
