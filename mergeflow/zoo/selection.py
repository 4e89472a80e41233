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
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mergeflow.checkpoint import open_checkpoint
from mergeflow.engine import merge_checkpoints
from mergeflow.errors import MergeflowError
from mergeflow.grid import basis_key, build_grid_basis, point_states, remove_basis, scaling_groups
from mergeflow.hashing import sha256_file_cached
from mergeflow.methods import get_method, params_record, parse_params
from mergeflow.writer import write_text_atomic
from mergeflow.zoo.evalcache import EvaluationCache
from mergeflow.zoo.evaluation import combine_parts, part_of
from mergeflow.zoo.registry import evaluator_for, read_zoo

log = logging.getLogger("mergeflow.selection")


class Halving(BaseModel):
    """``selection.halving:`` successive halving on validation folds. The split is cut into ``folds``
    disjoint folds (example i in fold i mod ``folds``); rung r scores its points on the first
    ``rungs[r]`` folds (a share s of the split), then sends on to the next rung the best
    max(``min_keep``, ⌈n/``eta``⌉) *and* every point within ``margin``/√s percentage points of the
    rung's leader (a mean over a share s is about 1/√s times noisier than over the whole split, so a
    flat stretch of the grid is not cut on noise); the last rung is every fold. Without the margin the
    cost in whole validation passes for n points, rungs (1, 2, 4) of 4 folds and η = 3 is n/4 + k₁/4
    + k₂/2 with k₁ = max(2, ⌈n/3⌉), k₂ = max(2, ⌈k₁/3⌉): 4.0 for n = 9, 16 for n = 40, against n for
    the exhaustive grid; the margin adds what the scores call for."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    folds: int = Field(4, ge=2, le=64)
    rungs: tuple[int, ...] = (1, 2, 4)
    eta: int = Field(3, ge=2)
    min_keep: int = Field(2, ge=1)
    margin: float = Field(1.5, ge=0.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _rungs_grow_to_every_fold(self) -> Halving:
        r = self.rungs
        if not r or any(b <= a for a, b in itertools.pairwise(r)) or r[0] < 1 or r[-1] != self.folds:
            raise ValueError(f"halving rungs {list(r)}: increasing fold counts from >= 1 ending at folds={self.folds}")
        return self


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


class _Grid:
    """One method's grid points over one zoo: the grid basis they are formed from (:mod:`mergeflow.grid`),
    built on demand, and the evaluation job of any point on any split or fold."""

    def __init__(self, zoo_dir: Path, method: str, points: list[dict[str, Any]], out_dir: Path):
        zoo = read_zoo(zoo_dir)
        self.zoo_dir, self.method, self.points = zoo_dir, method, points
        self.theta0 = Path(zoo["theta0"]["file"])
        self.models = [Path(info["model"]) for info in zoo["tasks"].values()]
        self.groups = scaling_groups(method, points)
        self.key = basis_key(method, self.groups, [sha256_file_cached(p) for p in (self.theta0, *self.models)],
                             "float32")  # fmt: skip
        self.basis_dir = out_dir / "grid" / f"{method}-{self.key[:12]}"
        self.cache_dir = out_dir / "evaluations"
        self.evaluations = EvaluationCache(zoo_dir, self.cache_dir)
        self.cells = [(index, scaling) for index, group in enumerate(self.groups)
                      for scaling in group["scalings"] or [None]]  # fmt: skip
        self.values = [{**self.groups[g]["params"], **({} if lam is None else {"scaling": lam})}
                       for g, lam in self.cells]  # fmt: skip
        self.labels = point_labels(method, self.values)
        self.seconds: float | None = None

    def job(self, point: int, split: str) -> tuple[Any, ...]:
        group, scaling = self.cells[point]
        return (str(self.zoo_dir), str(self.basis_dir), self.key, group, scaling, split, str(self.cache_dir))

    def evaluate(
        self, jobs: list[tuple[Any, ...]], labels: list[str], device: str, map_points: MapPoints | None
    ) -> list[Any]:
        """Run the jobs; the basis (one merge pass) is built first when some job is not cached."""
        if not all(self.evaluations.point_path(*job[2:6]).exists() for job in jobs):
            basis = self.basis_dir / "basis.json"
            if not basis.exists() or json.loads(basis.read_text())["key"] != self.key:
                start = time.perf_counter()
                built = build_grid_basis(self.method, self.theta0, self.models, self.points, self.basis_dir,
                                         device=device)  # fmt: skip
                if built["key"] != self.key:
                    raise MergeflowError(f"{self.method}: the grid basis was built from inputs that changed meanwhile")
                self.seconds = (self.seconds or 0.0) + time.perf_counter() - start
        return (map_points or _serial)(evaluate_grid_point, jobs, labels)


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
    grid = _Grid(Path(zoo_dir), method, points, Path(out_dir))
    jobs = [grid.job(i, split) for i in range(len(grid.values))]
    evaluated = grid.evaluate(jobs, grid.labels, device, map_points)
    if not keep_basis:
        remove_basis(grid.basis_dir)
    return list(zip(grid.values, evaluated, strict=True)), grid.seconds


Results = list[dict[str, dict[str, float]]]  # one {task: scores} per output model


def halving_grid_points(
    zoo_dir: str | Path,
    method: str,
    points: list[dict[str, Any]],
    out_dir: str | Path,
    rank: Callable[[Results], float],
    halving: Halving,
    device: str = "auto",
    map_points: MapPoints | None = None,
) -> tuple[list[tuple[dict[str, Any], Results, float]], float | None]:
    """Successive halving over the grid on validation: every point is scored on the first rung's
    folds (:func:`~mergeflow.zoo.evaluation.split_part`), the best ⌈n/η⌉ (at least ``min_keep``,
    by ``rank``, ties in grid order) and those within the margin of the leader (:class:`Halving`) go
    on to the next rung's further folds, and so on until the survivors have seen every fold. A
    survivor's scores are then its whole-split scores (disjoint folds joined: Σ correct / Σ n), so
    the chosen point and its score are the exhaustive grid's whenever the exhaustive best survives.
    Each (point, fold) is its own cached evaluation.

    Returns [(point parameters, results joined over the folds it saw, share of validation seen)] in
    grid order, and the merge pass's seconds (None when every evaluation was cached).
    """
    grid = _Grid(Path(zoo_dir), method, points, Path(out_dir))
    folds = halving.folds
    alive = list(range(len(grid.values)))
    seen_by: dict[int, list[Results]] = {i: [] for i in alive}
    share = dict.fromkeys(alive, 0.0)
    joined: dict[int, Results] = {}
    start_fold = 0
    for rung, upto in enumerate(halving.rungs):
        cells = [(i, f) for i in alive for f in range(start_fold, upto)]
        jobs = [grid.job(i, part_of("validation", f, folds)) for i, f in cells]
        labels = [f"{grid.labels[i]}@{f}/{folds}" for i, f in cells]
        for (i, _), results in zip(cells, grid.evaluate(jobs, labels, device, map_points), strict=True):
            seen_by[i].append(results)
        for i in alive:
            joined[i] = [combine_parts(outputs) for outputs in zip(*seen_by[i], strict=True)]
            share[i] = upto / folds
        start_fold = upto
        if rung + 1 < len(halving.rungs):
            keep = max(halving.min_keep, math.ceil(len(alive) / halving.eta))
            scores = {i: rank(joined[i]) for i in alive}
            order = sorted(alive, key=lambda i: -scores[i])  # stable: ties in grid order
            near = scores[order[0]] - halving.margin / 100 * math.sqrt(folds / upto)
            alive = sorted(set(order[:keep]) | {i for i in alive if scores[i] >= near})
            log.info("%s: rung %d (%d/%d of validation): %d point%s go on", method, rung, upto, folds, len(alive),
                     "" if len(alive) == 1 else "s")  # fmt: skip
    remove_basis(grid.basis_dir)
    return [(grid.values[i], joined[i], share[i]) for i in range(len(grid.values))], grid.seconds


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
    halving: Halving | None = None,
) -> dict[str, Any]:
    """Score one method's grid on validation, merge the best exactly, test it once.

    The grid's points come from one streamed merge pass. ``halving`` None scores every point on the
    whole validation split (:func:`score_grid_points`); otherwise successive halving
    (:func:`halving_grid_points`) scores most points on part of it and chooses among the points that
    saw all of it. ``map_points(fn, jobs, labels)`` evaluates them (default: one after another; the
    pipeline passes concurrent tasks). Only the chosen model stays on disk.
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

    points = grid_points(base, grid)
    if halving is None or len(points) <= halving.min_keep:
        scored, basis_seconds = score_grid_points(zoo_dir, method, points, out_dir, "validation", device, map_points)
        searched = [(values, results, 1.0) for values, results in scored]
    else:
        searched, basis_seconds = halving_grid_points(
            zoo_dir, method, points, out_dir, lambda results: score(task_scores(results)), halving, device, map_points
        )
    tried = []
    for values, results, share in searched:
        val = task_scores(results)
        tried.append({"params": params_record(parse_params(method, values)), "validation": val, "score": score(val),
                      "validation_share": share})  # fmt: skip
    best = max((r for r in tried if r["validation_share"] == 1.0), key=lambda r: r["score"])  # first of equals
    best_tag = hashlib.sha256(json.dumps(best["params"], sort_keys=True).encode()).hexdigest()[:12]
    name = f"{method}-{best_tag}" + ("" if spec.per_task_outputs else ".safetensors")
    target = out_dir / "merged" / name
    merged = merge_checkpoints(method, theta0, models, target, best["params"], device=device)  # exact, not A + λ·D
    test = task_scores([evaluator(p, "test") for p in merged.outputs])
    cost = sum(r["validation_share"] for r in tried)  # validation passes spent, in whole-split units
    log.info("%s: %d grid point%s, %.2f validation passes (merge pass: %s s), chose %s", method, len(tried),
             "" if len(tried) == 1 else "s", cost, "cached" if basis_seconds is None else f"{basis_seconds:.1f}",
             best["params"])  # fmt: skip
    row = {"method": method, "params": best["params"], "validation": best["validation"], "test": test,
           "grid_points": len(tried), "validation_passes": cost,
           "outputs": [str(p) for p in merged.outputs]}  # fmt: skip
    if spec.per_task_outputs:  # what keeping every task's model costs beyond θ0 (recorded by the merge)
        with open_checkpoint(merged.outputs[0]) as reader:
            row["storage"] = json.loads(reader.metadata["mergeflow.storage"])
    return {"row": row, "sweep": tried, "basis_seconds": basis_seconds}
