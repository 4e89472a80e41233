"""AdaMerging on a built zoo (text or vision): coefficients learned on unlabelled batches of each
task's *test* examples (the transductive protocol of AdaMerging; labels are never read), then the adapted model is
evaluated like every other merge.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergeflow.adamerging import AdaMergingParams
from mergeflow.adaptation import adapt_checkpoints, adaptation_fingerprint
from mergeflow.codeid import code_identity
from mergeflow.zoo.evalcache import EvaluationCache
from mergeflow.zoo.registry import make_evaluator, read_zoo


def adapt_zoo(
    zoo_dir: str | Path, name: str, params: AdaMergingParams, out_dir: str | Path, device: str = "auto"
) -> dict[str, Any]:
    """Run one AdaMerging variant on the zoo (on CUDA when ``device`` resolves to it); returns its
    report row, loss curve and coefficients.

    The adapted model is written atomically with a fingerprint of everything that determines it,
    so a rerun with the same inputs loads it instead of training again.
    """
    zoo_dir, out_dir = Path(zoo_dir), Path(out_dir)
    zoo = read_zoo(zoo_dir)
    tasks = list(zoo["tasks"])
    theta0 = Path(zoo["theta0"]["file"])
    models = [Path(zoo["tasks"][t]["model"]) for t in tasks]
    # the evaluator's identity: the zoo's data and the code of its evaluators
    evaluator_id = json.dumps({"data": [zoo["tasks"][t]["data_sha256"] for t in tasks],
                               "code": code_identity(__name__)})  # fmt: skip
    fingerprint = adaptation_fingerprint(params, theta0, models, evaluator_id)
    target = out_dir / "merged" / f"{name}-{fingerprint[:12]}.safetensors"
    adapted = adapt_checkpoints(
        theta0, models, _Lazy(zoo_dir), params, target, evaluator_id=evaluator_id, device=device, name=name
    )
    history, coefficients, seconds = adapted["history"], adapted["coefficients"], adapted["seconds"]
    evaluator = EvaluationCache(zoo_dir, out_dir / "evaluations")
    scores = {
        split: {t: r["accuracy"] for t, r in evaluator(target, split).items()} for split in ("validation", "test")
    }
    row = {"method": name, "params": params.model_dump(mode="json"), "validation": scores["validation"],
           "test": scores["test"], "outputs": [str(target)], "grid_points": 0}  # fmt: skip
    return {"row": row, "history": history, "coefficients": coefficients, "tasks": tasks, "seconds": seconds}


class _Lazy:
    """The zoo's evaluator, built only if adaptation actually runs (a reused model needs none)."""

    def __init__(self, zoo_dir: Path):
        self.zoo_dir = zoo_dir
        self._engine: Any = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._engine is None:
            self._engine = make_evaluator(self.zoo_dir)
        return getattr(self._engine, name)
