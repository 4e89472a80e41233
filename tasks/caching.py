"""Content-based cache keys: sha256 of input files, the parameters, and the code the task runs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["content_key", "files_exist"]


def content_key(**parts: Any) -> str:
    """One key from JSON-able parts (hashes, parameters, code versions)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def files_exist(paths: Iterable[str | Path]) -> bool:
    return all(Path(p).exists() for p in paths)
