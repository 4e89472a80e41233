"""CART accuracy against rank ratio (and scaling) on a text zoo, from one grid basis: every point
scored on validation; per rank, the best scaling on validation is then scored on test."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergeflow.grid import build_grid_basis, point_states, remove_basis
from mergeflow.hashing import sha256_file_cached
from mergeflow.zoo.report import _normalized, evaluate_baselines, evaluate_grid_point, grid_points

log = logging.getLogger("mergeflow.analysis")


def cart_rank_curve(
    zoo_dir: str | Path, ranks: Sequence[float], scalings: Sequence[float], out_dir: str | Path, device: str = "auto"
) -> dict[str, Any]:
    from mergeflow.grid import basis_key, scaling_groups
    from mergeflow.zoo.evaluator import evaluator_for

    zoo_dir, out_dir = Path(zoo_dir), Path(out_dir)
    zoo = json.loads((zoo_dir / "zoo.json").read_text())
    tasks = list(zoo["tasks"])
    theta0, models = zoo["theta0"]["file"], [zoo["tasks"][t]["model"] for t in tasks]
    individual = evaluate_baselines(zoo_dir, out_dir)["individual"]
    points = grid_points({}, {"rank_ratio": list(ranks), "scaling": list(scalings)})
    groups = scaling_groups("cart", points)
    key = basis_key("cart", groups, [sha256_file_cached(p) for p in (theta0, *models)], "float32")
    basis_dir = out_dir / "grid" / f"rank-curve-{key[:12]}"
    basis = build_grid_basis("cart", theta0, models, points, basis_dir, device=device)
    engine = evaluator_for(zoo_dir)
    curve = []
    try:
        for index, group in enumerate(groups):
            scored = []
            for scaling in group["scalings"]:
                result = evaluate_grid_point(zoo_dir, basis_dir, key, index, scaling, "validation",
                                             out_dir / "evaluations")[0]  # fmt: skip
                val = {t: result[t]["accuracy"] for t in tasks}
                scored.append((_normalized(val, individual["validation"]), scaling, val))
            score, best, val = max(scored, key=lambda s: s[0])
            test_result = engine.evaluate(point_states(basis, index, best)[0], "test")
            test = {t: test_result[t]["accuracy"] for t in tasks}
            curve.append({"rank_ratio": group["params"]["rank_ratio"], "scaling": best, "validation": val,
                          "validation_score": score, "test": test,
                          "test_normalized": _normalized(test, individual["test"]),
                          "all_scalings": {str(s): sc for sc, s, _ in scored}})  # fmt: skip
    finally:
        remove_basis(basis_dir)
    return {"tasks": tasks, "curve": curve, "scalings": list(scalings)}
