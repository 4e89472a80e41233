"""Checkpoint manifests (what ``mergeflow acquire`` writes): θ0 and the fine-tunes of one merge.

A manifest is a JSON object with ``pretrained`` (a path) and ``finetuned`` (a non-empty list of
paths); relative paths are taken from the current directory, as ``acquire`` writes them. Other
fields (``preset``, ``tasks``, ``sha256``) are informational here.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from pathlib import Path

from mergeflow.errors import ConfigError


@dataclass(frozen=True)
class Manifest:
    pretrained: str
    finetuned: list[str]


def read_manifest(path: str | Path) -> Manifest:
    """Read and check a manifest; every problem is one :class:`ConfigError` line naming the file."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such manifest file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the manifest ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{path}: the manifest is not a regular file")
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the manifest ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise ConfigError(f"{path}: the manifest is not JSON{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the manifest must be a JSON object with 'pretrained' and 'finetuned'")
    pretrained, finetuned = data.get("pretrained"), data.get("finetuned")
    if not isinstance(pretrained, str) or not pretrained:
        raise ConfigError(f"{path}: 'pretrained' must be the path of θ0 (a string)")
    if not isinstance(finetuned, list) or not finetuned or not all(isinstance(p, str) and p for p in finetuned):
        raise ConfigError(f"{path}: 'finetuned' must be a non-empty list of checkpoint paths")
    return Manifest(pretrained, list(finetuned))
