"""Content-based cache keys: sha256 of input files, the parameters, and the code the task runs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mergeflow

LIBRARY = Path(mergeflow.__file__).resolve().parent


def code_version(*modules: str) -> str:
    """sha256 of the library sources a task depends on (relative paths under ``mergeflow/``)."""
    digest = hashlib.sha256(mergeflow.__version__.encode())
    for module in sorted(modules):
        for path in sorted((LIBRARY / module).rglob("*.py")) if (LIBRARY / module).is_dir() else [LIBRARY / module]:
            digest.update(path.read_bytes())
    return digest.hexdigest()


def content_key(**parts: Any) -> str:
    """One key from JSON-able parts (hashes, parameters, code versions)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def files_exist(paths: Iterable[str | Path]) -> bool:
    return all(Path(p).exists() for p in paths)
