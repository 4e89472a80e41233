"""Cost of a parameter grid on the text-minilm zoo: one grid basis pass against independent merges.

    python benchmarks/bench_grid.py                      # needs a built zoo (`mergeflow zoo build`)
    python benchmarks/bench_grid.py --independent 10     # time 10 independent merges, extrapolate to all

Measures, for CART's 80-point grid (10 scalings × 8 rank ratios, the paper-recipe preset):
- ``basis``: :func:`mergeflow.grid.build_grid_basis` (one streamed pass, one truncated SVD per task and
  matrix at the largest rank, written to disk);
- ``point``: forming one grid point A + λ·D from the basis (what each grid evaluation adds);
- ``independent``: :func:`mergeflow.engine.merge_checkpoints` at distinct grid points (each writes its
  file), timed for ``--independent`` points (default: all 80) and scaled to 80 when fewer;
- ``evaluation``: one validation evaluation of a merged model, for scale.
Results go to ``benchmarks/results/grid-text-minilm.json`` and are quoted in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from mergeflow.engine import merge_checkpoints
from mergeflow.grid import build_grid_basis, point_states
from mergeflow.zoo.selection import grid_points
from mergeflow.zoo.text_evaluator import TextEvaluator

RANK_RATIOS = [0.02, 0.04, 0.08, 0.12, 0.16, 0.24, 0.32, 0.5]
SCALINGS = [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0]
log = logging.getLogger("bench_grid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default="out/zoo/text-minilm")
    parser.add_argument("--independent", type=int, default=80, help="independent merges to time (≤ 80)")
    parser.add_argument("--out", default="benchmarks/results/grid-text-minilm.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    zoo = json.loads((Path(args.zoo) / "zoo.json").read_text())
    theta0 = zoo["theta0"]["file"]
    models = [info["model"] for info in zoo["tasks"].values()]
    points = grid_points({}, {"scaling": SCALINGS, "rank_ratio": RANK_RATIOS})
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        basis = build_grid_basis("cart", theta0, models, points, Path(scratch) / "basis", device="cpu")
        basis_s = time.perf_counter() - start
        start = time.perf_counter()
        state = point_states(basis, 3, 2.0)[0]
        point_s = time.perf_counter() - start
        engine = TextEvaluator(args.zoo)
        engine.evaluate(state, "validation")  # warm-up: tokenisation and first-call costs
        start = time.perf_counter()
        engine.evaluate(state, "validation")
        evaluation_s = time.perf_counter() - start
        chosen = points[:: max(1, len(points) // max(1, args.independent))][: args.independent]
        start = time.perf_counter()
        for i, point in enumerate(chosen):
            merge_checkpoints("cart", theta0, models, Path(scratch) / f"m{i}.safetensors", point, device="cpu")
            (Path(scratch) / f"m{i}.safetensors").unlink()
        independent_s = (time.perf_counter() - start) * len(points) / len(chosen)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "grid_points": len(points),
        "basis_seconds": round(basis_s, 2),
        "point_seconds": round(point_s, 3),
        "independent_merges_timed": len(chosen),
        "independent_seconds_for_grid": round(independent_s, 1),
        "ratio": round(independent_s / basis_s, 1),
        "validation_evaluation_seconds": round(evaluation_s, 2),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    log.info("%s", json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
