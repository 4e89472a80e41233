"""``zoo.json``: the description of a built zoo, as one pydantic model every zoo writes and every
step reads (θ0, each task's fine-tune, head and data with their hashes, the settings it was built
with). Zoo-specific extras (the CLIP zoo's text tower, preset, sources) are kept as extra fields.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from mergeflow.errors import MergeflowError
from mergeflow.writer import write_text_atomic

FILE = "zoo.json"


class CheckpointEntry(BaseModel):
    """A checkpoint of the zoo: where it is and its sha256."""

    model_config = ConfigDict(frozen=True, extra="allow")

    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class TaskEntry(BaseModel):
    """One task: its classes, fine-tune, frozen head and data manifest (with the data's digest)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    classes: list[str]
    model: str
    head: str
    data: str
    data_sha256: str


class ZooDescription(BaseModel):
    """The whole of ``zoo.json``."""

    model_config = ConfigDict(frozen=True, extra="allow")

    name: str
    kind: str | None = None
    note: str = ""
    theta0: CheckpointEntry
    config: dict[str, Any]
    tasks: dict[str, TaskEntry] = Field(min_length=1)


def write_zoo(root: str | Path, zoo: dict[str, Any]) -> Path:
    """Check ``zoo`` against the model and write ``root/zoo.json`` atomically (same dict, same bytes)."""
    ZooDescription.model_validate(zoo)
    return write_text_atomic(Path(root) / FILE, json.dumps(zoo, indent=1, ensure_ascii=False))


def read_zoo(zoo_dir: str | Path) -> dict[str, Any]:
    """A built zoo's description, checked against the model (one line naming the file when it is
    missing, unreadable or of the wrong shape)."""
    path = Path(zoo_dir) / FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise MergeflowError(f"{path}: no zoo here; build it first (mergeflow zoo build)") from None
    except (OSError, ValueError) as exc:
        raise MergeflowError(f"{path}: unreadable zoo description ({exc})") from None
    try:
        ZooDescription.model_validate(raw)
    except PydanticValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
        raise MergeflowError(f"{path}: not a zoo description ({problems})") from None
    return raw


def zoo_files(zoo: dict[str, Any]) -> list[str]:
    """Every file a built zoo consists of: θ0, and per task its fine-tune, head and data manifest."""
    return [zoo["theta0"]["file"]] + [f for t in zoo["tasks"].values() for f in (t["model"], t["head"], t["data"])]
