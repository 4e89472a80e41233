"""The content-keyed evaluation cache that baselines, grids, the rank curve and AdaMerging share.

An evaluation is stored under the sha256 of what determines it: the checkpoint's bytes (or a grid
point: basis key, group and λ), the split, the zoo's data and heads, and the code identity of the
evaluator (:mod:`mergeflow.codeid`). A cached result is therefore never one of other bytes or of
older code. Results are JSON files, written atomically.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mergeflow.codeid import code_identity
from mergeflow.hashing import sha256_file, sha256_file_cached
from mergeflow.writer import write_text_atomic
from mergeflow.zoo.registry import evaluate_checkpoint, read_zoo

EVAL_CODE = "mergeflow.zoo.registry"  # the code identity of every cached evaluation: every zoo's evaluator

Scores = dict[str, dict[str, float]]  # task -> {"accuracy", "loss", "n"}


class EvaluationCache:
    """Evaluate checkpoint files of one zoo on a split, each (bytes, split) at most once."""

    def __init__(self, zoo_dir: str | Path, cache_dir: str | Path):
        self.zoo_dir, self.cache_dir = Path(zoo_dir), Path(cache_dir)
        zoo = read_zoo(self.zoo_dir)
        self.tasks = list(zoo["tasks"])
        parts = [t["data_sha256"] + sha256_file_cached(t["head"]) for t in zoo["tasks"].values()]  # data and heads
        self.data_key = hashlib.sha256("".join(parts).encode()).hexdigest()

    def __call__(self, checkpoint: str | Path, split: str) -> Scores:
        identity = f"{sha256_file(checkpoint)}:{split}:{self.data_key}:{code_identity(EVAL_CODE)}"
        cached = self.cache_dir / f"{hashlib.sha256(identity.encode()).hexdigest()}.json"
        if cached.exists():
            return json.loads(cached.read_text())
        result = evaluate_checkpoint(self.zoo_dir, checkpoint, split)
        write_text_atomic(cached, json.dumps(result))
        return result

    def point_path(self, basis: str, group: int, scaling: float | None, split: str) -> Path:
        """Where the evaluation of grid point (basis, group, λ) on ``split`` is cached."""
        point = f"{basis}:{group}:{scaling!r}:{split}:{self.data_key}:{code_identity(EVAL_CODE)}"
        return self.cache_dir / f"grid-{hashlib.sha256(point.encode()).hexdigest()}.json"
