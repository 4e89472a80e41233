"""CART accuracy against rank ratio (and scaling) on a text zoo, from one grid basis: every point
scored on validation; per rank, the best scaling on validation is then scored on test."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergeflow.zoo.description import read_zoo
from mergeflow.zoo.selection import evaluate_baselines, grid_points, normalized, score_grid_points

log = logging.getLogger("mergeflow.analysis")


def cart_rank_curve(
    zoo_dir: str | Path, ranks: Sequence[float], scalings: Sequence[float], out_dir: str | Path, device: str = "auto"
) -> dict[str, Any]:
    zoo_dir, out_dir = Path(zoo_dir), Path(out_dir)
    tasks = list(read_zoo(zoo_dir)["tasks"])
    individual = evaluate_baselines(zoo_dir, out_dir)["individual"]
    points = grid_points({}, {"rank_ratio": list(ranks), "scaling": list(scalings)})
    validation, _ = score_grid_points(zoo_dir, "cart", points, out_dir, "validation", device, keep_basis=True)
    by_rank: dict[float, list[tuple[float, float, dict[str, float]]]] = {}
    for values, results in validation:
        val = {t: results[0][t]["accuracy"] for t in tasks}
        by_rank.setdefault(values["rank_ratio"], []).append((normalized(val, individual["validation"]),
                                                             values["scaling"], val))  # fmt: skip
    chosen = {rank: max(scored, key=lambda s: s[0]) for rank, scored in by_rank.items()}
    # the same ranks, one point each: the same basis (kept above), removed after this call
    tested, _ = score_grid_points(
        zoo_dir, "cart", [{"rank_ratio": r, "scaling": c[1]} for r, c in chosen.items()], out_dir, "test", device
    )
    curve = []
    for values, results in tested:
        score, best, val = chosen[values["rank_ratio"]]
        test = {t: results[0][t]["accuracy"] for t in tasks}
        curve.append({"rank_ratio": values["rank_ratio"], "scaling": best, "validation": val,
                      "validation_score": score, "test": test, "test_normalized": normalized(test, individual["test"]),
                      "all_scalings": {str(s): sc for sc, s, _ in by_rank[values["rank_ratio"]]}})  # fmt: skip
    return {"tasks": tasks, "curve": curve, "scalings": list(scalings)}
