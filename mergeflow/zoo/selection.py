"""Choosing each method's parameters on validation: grid points from one merge pass, scored on the
validation split, the best merged exactly and tested once; and the baselines they are judged by.

Selection criterion: mean normalised accuracy (merged / individual fine-tune, per task) on
validation, or mean absolute accuracy. Every evaluation goes through the content-keyed
:class:`~mergeflow.zoo.evalcache.EvaluationCache`, so a rerun with nothing changed evaluates nothing.
No plotting or Markdown here (:mod:`mergeflow.zoo.report` presents the results).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mergeflow.checkpoint import open_checkpoint
from mergeflow.engine import merge_checkpoints
from mergeflow.errors import MergeflowError
from mergeflow.grid import basis_key, build_grid_basis, point_states, remove_basis, scaling_groups
from mergeflow.hashing import sha256_file_cached
from mergeflow.methods import get_method, params_record, parse_params
from mergeflow.writer import write_text_atomic
from mergeflow.zoo.evalcache import EvaluationCache
from mergeflow.zoo.registry import evaluator_for, read_zoo

log = logging.getLogger("mergeflow.selection")


def grid_points(base: Mapping[str, Any], grid: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of ``grid`` values over the ``base`` parameters."""
    names = list(grid)
    return [{**base, **dict(zip(names, values, strict=True))} for values in itertools.product(*grid.values())] or [
        dict(base)
    ]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def accuracies(result: dict[str, dict[str, float]], tasks: list[str]) -> dict[str, float]:
    return {t: result[t]["accuracy"] for t in tasks}


def normalized(scores: dict[str, float], individual: dict[str, float]) -> float:
    return mean([scores[t] / max(individual[t], 1e-9) for t in individual])


def evaluate_baselines(zoo_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """θ0 and every fine-tune on every task; ``individual`` holds each fine-tune on its own task."""
    zoo_dir, out_dir = Path(zoo_dir), Path(out_dir)
    zoo = read_zoo(zoo_dir)
    evaluator = EvaluationCache(zoo_dir, out_dir / "evaluations")
    tasks = evaluator.tasks
    models = {t: Path(zoo["tasks"][t]["model"]) for t in tasks}
    individual = {
        split: {t: accuracies(evaluator(models[t], split), tasks)[t] for t in tasks} for split in ("validation", "test")
    }
    zero = {split: accuracies(evaluator(Path(zoo["theta0"]["file"]), split), tasks) for split in ("validation", "test")}
    rows = [{"method": "zero-shot (θ0)", "params": {}, "test": zero["test"], "validation": zero["validation"]}]
    rows += [
        {"method": f"fine-tuned on {t}", "params": {}, "test": accuracies(evaluator(models[t], "test"), tasks)}
        for t in tasks
    ]
    return {"tasks": tasks, "individual": individual, "rows": rows}


def evaluate_grid_point(
    zoo_dir: str | Path,
    basis_dir: str | Path,
    basis_key: str,
    group: int,
    scaling: float | None,
    split: str,
    cache_dir: str | Path,
) -> list[dict[str, dict[str, float]]]:
    """Evaluate one grid point A + λ·D of a basis (one result per output model), cached by content."""
    cached = EvaluationCache(zoo_dir, cache_dir).point_path(basis_key, group, scaling, split)
    if cached.exists():
        return json.loads(cached.read_text())
    basis = json.loads((Path(basis_dir) / "basis.json").read_text())
    if basis["key"] != basis_key:
        raise MergeflowError(f"{basis_dir}: grid basis {basis['key'][:12]} is not the expected {basis_key[:12]}")
    engine = evaluator_for(zoo_dir)
    states = point_states(basis, group, scaling)
    if basis["per_task_outputs"]:  # output i serves task i only
        results = [engine.evaluate(state, split, [task]) for state, task in zip(states, engine.tasks, strict=True)]
    else:
        results = [engine.evaluate(state, split) for state in states]
    write_text_atomic(cached, json.dumps(results))
    return results


def _serial(function: Callable[..., Any], jobs: list[tuple[Any, ...]], labels: list[str]) -> list[Any]:
    return [function(*job) for job in jobs]


MapPoints = Callable[[Callable[..., Any], list[tuple[Any, ...]], list[str]], list[Any]]

SYMBOLS = {"scaling": "λ", "rank_ratio": "k"}  # the papers' names for the parameters grids vary most


def point_labels(method: str, points: list[dict[str, Any]]) -> list[str]:
    """``cart[λ=2, k=0.12]`` per point: the method and the parameters that differ between the points."""
    varying = [k for k in dict.fromkeys(k for p in points for k in p) if len({repr(p.get(k)) for p in points}) > 1]

    def show(value: Any) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    labels = []
    for point in points:
        shown = ", ".join(
            f"{SYMBOLS.get(k, k)}={show(point[k])}" for k in sorted(varying, key=_label_order) if k in point
        )
        labels.append(f"{method}[{shown}]" if shown else method)
    return labels


def _label_order(name: str) -> tuple[int, str]:
    return (list(SYMBOLS).index(name) if name in SYMBOLS else len(SYMBOLS), name)


def score_grid_points(
    zoo_dir: str | Path,
    method: str,
    points: list[dict[str, Any]],
    out_dir: str | Path,
    split: str = "validation",
    device: str = "auto",
    map_points: MapPoints | None = None,
    keep_basis: bool = False,
) -> tuple[list[tuple[dict[str, Any], list[dict[str, dict[str, float]]]]], float | None]:
    """Evaluate grid points of one method on ``split`` from a grid basis (see :mod:`mergeflow.grid`).

    The basis (one merge pass) is built only when some point's evaluation is not cached, and removed
    afterwards unless ``keep_basis``. ``map_points(fn, jobs, labels)`` runs the evaluations (default:
    one after another; ``labels`` name each point, see :func:`point_labels`). Returns [(point
    parameters, results per output model)] in grid-group order, and the merge pass's seconds (None
    when no pass was needed).
    """
    zoo_dir, out_dir = Path(zoo_dir), Path(out_dir)
    zoo = read_zoo(zoo_dir)
    theta0 = Path(zoo["theta0"]["file"])
    models = [Path(info["model"]) for info in zoo["tasks"].values()]
    groups = scaling_groups(method, points)
    key = basis_key(method, groups, [sha256_file_cached(p) for p in (theta0, *models)], "float32")
    basis_dir = out_dir / "grid" / f"{method}-{key[:12]}"
    cache_dir = out_dir / "evaluations"
    evaluations = EvaluationCache(zoo_dir, cache_dir)
    jobs = [
        (str(zoo_dir), str(basis_dir), key, index, scaling, split, str(cache_dir))
        for index, group in enumerate(groups)
        for scaling in group["scalings"] or [None]
    ]
    seconds = None
    if not all(evaluations.point_path(*job[2:6]).exists() for job in jobs):
        start = time.perf_counter()
        if not (basis_dir / "basis.json").exists() or json.loads((basis_dir / "basis.json").read_text())["key"] != key:
            built = build_grid_basis(method, theta0, models, points, basis_dir, device=device)
            if built["key"] != key:
                raise MergeflowError(f"{method}: the grid basis was built from inputs that changed meanwhile")
        seconds = time.perf_counter() - start
    values = [{**groups[job[3]]["params"], **({} if job[4] is None else {"scaling": job[4]})} for job in jobs]
    evaluated = (map_points or _serial)(evaluate_grid_point, jobs, point_labels(method, values))
    if not keep_basis:
        remove_basis(basis_dir)
    return list(zip(values, evaluated, strict=True)), seconds


def select_method(
    zoo_dir: str | Path,
    method: str,
    base: Mapping[str, Any],
    grid: Mapping[str, list[Any]],
    out_dir: str | Path,
    individual: Mapping[str, Mapping[str, float]],
    criterion: str = "normalized",
    device: str = "auto",
    map_points: MapPoints | None = None,
) -> dict[str, Any]:
    """Score every grid point of one method on validation, merge the best exactly, test it once.

    The grid's points come from one streamed merge pass (:func:`score_grid_points`);
    ``map_points(fn, jobs, labels)`` evaluates them (default: one after another; the pipeline passes
    concurrent tasks). Only the chosen model stays on disk.
    """
    zoo_dir, out_dir = Path(zoo_dir), Path(out_dir)
    zoo = read_zoo(zoo_dir)
    evaluator = EvaluationCache(zoo_dir, out_dir / "evaluations")
    tasks = evaluator.tasks
    theta0 = Path(zoo["theta0"]["file"])
    models = [Path(zoo["tasks"][t]["model"]) for t in tasks]
    spec = get_method(method)

    def task_scores(results: list[dict[str, dict[str, float]]]) -> dict[str, float]:
        if spec.per_task_outputs:  # each task scored with its own model
            return {t: results[i][t]["accuracy"] for i, t in enumerate(tasks)}
        return accuracies(results[0], tasks)

    def score(val: dict[str, float]) -> float:
        return (
            normalized(val, dict(individual["validation"])) if criterion == "normalized" else mean(list(val.values()))
        )

    scored, basis_seconds = score_grid_points(
        zoo_dir, method, grid_points(base, grid), out_dir, "validation", device, map_points
    )
    tried = []
    for values, results in scored:
        val = task_scores(results)
        tried.append({"params": params_record(parse_params(method, values)), "validation": val, "score": score(val)})
    best = max(tried, key=lambda r: r["score"])
    best_tag = hashlib.sha256(json.dumps(best["params"], sort_keys=True).encode()).hexdigest()[:12]
    name = f"{method}-{best_tag}" + ("" if spec.per_task_outputs else ".safetensors")
    target = out_dir / "merged" / name
    merged = merge_checkpoints(method, theta0, models, target, best["params"], device=device)  # exact, not A + λ·D
    test = task_scores([evaluator(p, "test") for p in merged.outputs])
    log.info("%s: %d grid point%s (merge pass: %s s), chose %s", method, len(tried), "" if len(tried) == 1 else "s",
             "cached" if basis_seconds is None else f"{basis_seconds:.1f}", best["params"])  # fmt: skip
    row = {"method": method, "params": best["params"], "validation": best["validation"], "test": test,
           "grid_points": len(tried), "outputs": [str(p) for p in merged.outputs]}  # fmt: skip
    if spec.per_task_outputs:  # what keeping every task's model costs beyond θ0 (recorded by the merge)
        with open_checkpoint(merged.outputs[0]) as reader:
            row["storage"] = json.loads(reader.metadata["mergeflow.storage"])
    return {"row": row, "sweep": tried, "basis_seconds": basis_seconds}
