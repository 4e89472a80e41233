"""Built artefacts (zoo fine-tunes, heads, data, analysis models) and the rule that reuses them.

An artefact is rebuilt unless the file holds the fingerprint of what it would be built from now:
the inputs and settings in ``record``, and the code identity of the module that builds it
(:mod:`mergeflow.codeid`). The fingerprint is stored in the safetensors metadata
(``mergeflow.fingerprint``) when the artefact is written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mergeflow.checkpoint import stored_fingerprint
from mergeflow.codeid import code_identity
from mergeflow.errors import CheckpointError


def artefact_fingerprint(record: Mapping[str, Any], builder: str) -> str:
    """sha256 of ``record`` together with the code identity of the module ``builder`` that builds it."""
    full = {**record, "code": code_identity(builder)}
    return hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()


def is_current(path: str | Path, fingerprint: str) -> bool:
    """Whether ``path`` exists and was written with ``fingerprint`` (else it must be built again)."""
    return stored_fingerprint(path) == fingerprint


def load_strict(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str, may_lack: tuple[str, ...] = ()
) -> None:
    """Load ``state`` into ``module``; keys it lacks (other than those ending in ``may_lack``) or keys it
    does not know are one :class:`CheckpointError` line naming ``what``."""
    missing, unexpected = module.load_state_dict(dict(state), strict=False)
    missing = [k for k in missing if not k.endswith(may_lack)] if may_lack else list(missing)
    if missing or unexpected:
        raise CheckpointError(f"weights do not fit {what}: missing {missing[:3]}, unexpected {list(unexpected)[:3]}")
