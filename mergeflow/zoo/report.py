"""The zoo's results table: zero-shot, every fine-tune on every task, and every merge method with
its parameters chosen on the validation split (test evaluated once, for the chosen point).

Selection criterion: mean normalised accuracy (merged / individual fine-tune, per task) on
validation, or mean absolute accuracy. Evaluations are cached by the sha256 of the checkpoint and
the split, so a rerun with nothing changed evaluates nothing.
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

from mergeflow.codeid import code_identity
from mergeflow.engine import merge_checkpoints
from mergeflow.errors import MergeflowError
from mergeflow.hashing import sha256_file, sha256_file_cached
from mergeflow.methods import get_method, params_record, parse_params
from mergeflow.writer import write_text_atomic
from mergeflow.zoo.build import evaluate_checkpoint

log = logging.getLogger("mergeflow.report")
EVAL_CODE = "mergeflow.zoo.evaluator"  # the code identity of every cached evaluation (mergeflow.codeid)


def grid_points(base: Mapping[str, Any], grid: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of ``grid`` values over the ``base`` parameters."""
    names = list(grid)
    return [{**base, **dict(zip(names, values, strict=True))} for values in itertools.product(*grid.values())] or [
        dict(base)
    ]


class _Evaluator:
    def __init__(self, zoo_dir: Path, cache_dir: Path):
        self.zoo_dir, self.cache_dir = zoo_dir, cache_dir
        zoo = json.loads((zoo_dir / "zoo.json").read_text())
        self.tasks = list(zoo["tasks"])
        parts = [t["data_sha256"] + sha256_file_cached(t["head"]) for t in zoo["tasks"].values()]  # data and heads
        self.data_key = hashlib.sha256("".join(parts).encode()).hexdigest()

    def __call__(self, checkpoint: Path, split: str) -> dict[str, dict[str, float]]:
        identity = f"{sha256_file(checkpoint)}:{split}:{self.data_key}:{code_identity(EVAL_CODE)}"
        key = hashlib.sha256(identity.encode()).hexdigest()
        cached = self.cache_dir / f"{key}.json"
        if cached.exists():
            return json.loads(cached.read_text())
        result = evaluate_checkpoint(self.zoo_dir, checkpoint, split)
        write_text_atomic(cached, json.dumps(result))
        return result


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _accuracies(result: dict[str, dict[str, float]], tasks: list[str]) -> dict[str, float]:
    return {t: result[t]["accuracy"] for t in tasks}


def evaluate_baselines(zoo_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """θ0 and every fine-tune on every task; ``individual`` holds each fine-tune on its own task."""
    zoo_dir, out_dir = Path(zoo_dir), Path(out_dir)
    zoo = json.loads((zoo_dir / "zoo.json").read_text())
    evaluator = _Evaluator(zoo_dir, out_dir / "evaluations")
    tasks = evaluator.tasks
    models = {t: Path(zoo["tasks"][t]["model"]) for t in tasks}
    individual = {
        split: {t: _accuracies(evaluator(models[t], split), tasks)[t] for t in tasks}
        for split in ("validation", "test")
    }
    zero = {
        split: _accuracies(evaluator(Path(zoo["theta0"]["file"]), split), tasks) for split in ("validation", "test")
    }
    rows = [{"method": "zero-shot (θ0)", "params": {}, "test": zero["test"], "validation": zero["validation"]}]
    rows += [
        {"method": f"fine-tuned on {t}", "params": {}, "test": _accuracies(evaluator(models[t], "test"), tasks)}
        for t in tasks
    ]
    return {"tasks": tasks, "individual": individual, "rows": rows}


def _normalized(scores: dict[str, float], individual: dict[str, float]) -> float:
    return _mean([scores[t] / max(individual[t], 1e-9) for t in individual])


def _point_cache(cache_dir: str | Path, basis: str, group: int, scaling: float | None, split: str, data: str) -> Path:
    point = f"{basis}:{group}:{scaling!r}:{split}:{data}:{code_identity(EVAL_CODE)}"
    return Path(cache_dir) / f"grid-{hashlib.sha256(point.encode()).hexdigest()}.json"


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
    from mergeflow.grid import point_states
    from mergeflow.zoo.evaluator import evaluator_for

    cached = _point_cache(
        cache_dir, basis_key, group, scaling, split, _Evaluator(Path(zoo_dir), Path(cache_dir)).data_key
    )
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


def _serial(function: Callable[..., Any], jobs: list[tuple[Any, ...]]) -> list[Any]:
    return [function(*job) for job in jobs]


MapPoints = Callable[[Callable[..., Any], list[tuple[Any, ...]]], list[Any]]


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
    afterwards unless ``keep_basis``. ``map_points(fn, jobs)`` runs the evaluations (default: one
    after another). Returns [(point parameters, results per output model)] in grid-group order, and
    the merge pass's seconds (None when no pass was needed).
    """
    from mergeflow.grid import basis_key, build_grid_basis, remove_basis, scaling_groups

    zoo_dir, out_dir = Path(zoo_dir), Path(out_dir)
    zoo = json.loads((zoo_dir / "zoo.json").read_text())
    theta0 = Path(zoo["theta0"]["file"])
    models = [Path(info["model"]) for info in zoo["tasks"].values()]
    groups = scaling_groups(method, points)
    key = basis_key(method, groups, [sha256_file_cached(p) for p in (theta0, *models)], "float32")
    basis_dir = out_dir / "grid" / f"{method}-{key[:12]}"
    cache_dir = out_dir / "evaluations"
    data_key = _Evaluator(zoo_dir, cache_dir).data_key
    jobs = [
        (str(zoo_dir), str(basis_dir), key, index, scaling, split, str(cache_dir))
        for index, group in enumerate(groups)
        for scaling in group["scalings"] or [None]
    ]
    seconds = None
    if not all(_point_cache(cache_dir, *job[2:6], data_key).exists() for job in jobs):
        start = time.perf_counter()
        if not (basis_dir / "basis.json").exists() or json.loads((basis_dir / "basis.json").read_text())["key"] != key:
            built = build_grid_basis(method, theta0, models, points, basis_dir, device=device)
            if built["key"] != key:
                raise MergeflowError(f"{method}: the grid basis was built from inputs that changed meanwhile")
        seconds = time.perf_counter() - start
    evaluated = (map_points or _serial)(evaluate_grid_point, jobs)
    if not keep_basis:
        remove_basis(basis_dir)
    scored = []
    for job, results in zip(jobs, evaluated, strict=True):
        values = {**groups[job[3]]["params"], **({} if job[4] is None else {"scaling": job[4]})}
        scored.append((values, results))
    return scored, seconds


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
    ``map_points(fn, jobs)`` evaluates them (default: one after another; the pipeline passes
    concurrent tasks). Only the chosen model stays on disk.
    """
    zoo_dir, out_dir = Path(zoo_dir), Path(out_dir)
    zoo = json.loads((zoo_dir / "zoo.json").read_text())
    evaluator = _Evaluator(zoo_dir, out_dir / "evaluations")
    tasks = evaluator.tasks
    theta0 = Path(zoo["theta0"]["file"])
    models = [Path(zoo["tasks"][t]["model"]) for t in tasks]
    spec = get_method(method)

    def task_scores(results: list[dict[str, dict[str, float]]]) -> dict[str, float]:
        if spec.per_task_outputs:  # each task scored with its own model
            return {t: results[i][t]["accuracy"] for i, t in enumerate(tasks)}
        return _accuracies(results[0], tasks)

    def score(val: dict[str, float]) -> float:
        return (
            _normalized(val, dict(individual["validation"])) if criterion == "normalized" else _mean(list(val.values()))
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
    log.info("%s: %d grid points (merge pass: %s s), chose %s", method, len(tried),
             "cached" if basis_seconds is None else f"{basis_seconds:.1f}", best["params"])  # fmt: skip
    row = {"method": method, "params": best["params"], "validation": best["validation"], "test": test,
           "grid_points": len(tried), "outputs": [str(p) for p in merged.outputs]}  # fmt: skip
    return {"row": row, "sweep": tried, "basis_seconds": basis_seconds}


def assemble_report(
    zoo_dir: str | Path,
    baselines: dict[str, Any],
    selections: Mapping[str, dict[str, Any]],
    out_dir: str | Path,
    criterion: str = "normalized",
) -> dict[str, Any]:
    """Rows with mean and normalised test accuracy; results.json, report.md, metrics.json, plots."""
    zoo_dir, out_dir = Path(zoo_dir), Path(out_dir)
    zoo = json.loads((zoo_dir / "zoo.json").read_text())
    tasks = baselines["tasks"]
    rows = [dict(r) for r in baselines["rows"]] + [dict(sel["row"]) for sel in selections.values()]
    for row in rows:
        row["mean"] = _mean([row["test"][t] for t in tasks])
        row["normalized"] = _normalized(row["test"], baselines["individual"]["test"])
    report = {
        "zoo": str(zoo_dir),
        "zoo_name": zoo.get("name", "zoo"),
        "note": zoo.get("note", ""),
        "theta0_sha256": zoo["theta0"]["sha256"],
        "tasks": tasks,
        "criterion": criterion,
        "rows": rows,
        "sweeps": {method: sel["sweep"] for method, sel in selections.items() if "sweep" in sel},
        "grid_seconds": {m: sel["basis_seconds"] for m, sel in selections.items() if "basis_seconds" in sel},
        "adaptation": {
            name: {"history": sel["history"], "coefficients": sel["coefficients"], "seconds": sel["seconds"]}
            for name, sel in selections.items()
            if "history" in sel
        },
    }
    write_text_atomic(out_dir / "results.json", json.dumps(report, indent=1))
    note = f"\n\nNote: {report['note']}.\n" if report["note"] and report["zoo_name"] != "text-minilm" else "\n"
    write_text_atomic(out_dir / "report.md", render(report) + note)
    metrics = {r["method"]: {"mean": r["mean"], "normalized": r["normalized"]} for r in rows}
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=1))
    plot_report(report, out_dir)
    return report


def zoo_report(
    zoo_dir: str | Path,
    methods: Mapping[str, Mapping[str, Any]],
    grids: Mapping[str, Mapping[str, list[Any]]],
    out_dir: str | Path,
    criterion: str = "normalized",
    device: str = "auto",
    adaptation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Baselines, every method's validation-selected row, AdaMerging rows, then the assembled report."""
    from mergeflow.zoo.adapt import adapt_zoo

    start = time.perf_counter()
    baselines = evaluate_baselines(zoo_dir, out_dir)
    selections = {
        method: select_method(
            zoo_dir, method, base, grids.get(method, {}), out_dir, baselines["individual"], criterion, device
        )
        for method, base in methods.items()
    }
    for name, params in (adaptation or {}).items():
        selections[name] = adapt_zoo(zoo_dir, name, params, out_dir, device)
    report = assemble_report(zoo_dir, baselines, selections, out_dir, criterion)
    log.info("zoo report in %s (%.0f s)\n%s", out_dir, time.perf_counter() - start, render(report))
    return report


def render(report: dict[str, Any]) -> str:
    tasks = report["tasks"]
    lines = [
        "| model | chosen parameters | " + " | ".join(tasks) + " | mean | normalized |",
        "|---" * (len(tasks) + 4) + "|",
    ]
    for row in report["rows"]:
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items() if k not in ("exclude", "svd_solver"))
        cells = " | ".join(f"{100 * row['test'][t]:.1f}" for t in tasks)
        lines.append(
            f"| {row['method']} | {params or '–'} | {cells} | {100 * row['mean']:.1f} | {100 * row['normalized']:.1f} |"
        )
    return "\n".join(lines)


def plot_report(report: dict[str, Any], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["tasks"]
    merged = [
        r for r in report["rows"] if r["method"] not in ("zero-shot (θ0)",) and not r["method"].startswith("fine-tuned")
    ]
    fig, ax = plt.subplots(figsize=(2 + 1.1 * len(merged), 3.8))
    width = 0.8 / len(tasks)
    for i, task in enumerate(tasks):
        xs = [j + (i - (len(tasks) - 1) / 2) * width for j in range(len(merged))]
        ax.bar(xs, [100 * r["test"][task] for r in merged], width, label=task)
    ax.set_xticks(range(len(merged)), [r["method"] for r in merged], rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{report.get('zoo_name', 'zoo')}: merges with parameters chosen on validation")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy_by_task.png", dpi=110)
    plt.close(fig)
    _plot_grids(report, out_dir, plt)
    _plot_adaptation(report, out_dir, plt)


PLOTS = ("accuracy_by_task.png", "cart_rank_curve.png", "cart_grid_heatmap.png", "scaling_curves.png",
         "adaptation_entropy.png")  # fmt: skip


def _plot_grids(report: dict[str, Any], out_dir: Path, plt: Any) -> None:
    """CART: best validation score per rank (the bell-curve question) and the scaling × rank heatmap;
    every method: validation score against scaling."""
    cart = report["sweeps"].get("cart")
    if cart and len({p["params"]["rank_ratio"] for p in cart}) > 1:
        ranks = sorted({p["params"]["rank_ratio"] for p in cart})
        scalings = sorted({p["params"]["scaling"] for p in cart})
        score = {(p["params"]["rank_ratio"], p["params"]["scaling"]): 100 * p["score"] for p in cart}
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        ax.plot(ranks, [max(score.get((r, s), float("-inf")) for s in scalings) for r in ranks], marker="o",
                label="best scaling per rank")  # fmt: skip
        for s in scalings[:: max(1, len(scalings) // 4)]:
            ax.plot(ranks, [score.get((r, s), float("nan")) for r in ranks], alpha=0.5, lw=1, label=f"scaling {s}")
        ax.set_xscale("log")
        ax.set_xlabel("rank ratio (log scale)")
        ax.set_ylabel(f"validation score ({report['criterion']}, %)")
        ax.set_title("CART: validation score vs. rank")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "cart_rank_curve.png", dpi=110)
        plt.close(fig)
        grid = [[score.get((r, s), float("nan")) for r in ranks] for s in scalings]
        fig, ax = plt.subplots(figsize=(1.6 + 0.7 * len(ranks), 1.2 + 0.4 * len(scalings)))
        image = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis")
        ax.set_xticks(range(len(ranks)), [f"{r:g}" for r in ranks])
        ax.set_yticks(range(len(scalings)), [f"{s:g}" for s in scalings])
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=6, color="white")
        ax.set_xlabel("rank ratio")
        ax.set_ylabel("scaling λ")
        ax.set_title(f"CART validation score ({report['criterion']}, %)")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(out_dir / "cart_grid_heatmap.png", dpi=110)
        plt.close(fig)
    curves = {}
    for method, sweep in report["sweeps"].items():
        by_scaling: dict[float, float] = {}
        for p in sweep:
            if "scaling" in p["params"]:
                s = p["params"]["scaling"]
                by_scaling[s] = max(by_scaling.get(s, float("-inf")), 100 * p["score"])
        if len(by_scaling) > 1:
            curves[method] = sorted(by_scaling.items())
    if curves:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for method, points in curves.items():
            ax.plot([x for x, _ in points], [y for _, y in points], marker=".", label=method)
        ax.set_xlabel("scaling λ (other parameters at their best)")
        ax.set_ylabel(f"validation score ({report['criterion']}, %)")
        ax.set_title("Validation score vs. scaling")
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
        fig.tight_layout()
        fig.savefig(out_dir / "scaling_curves.png", dpi=110)
        plt.close(fig)


def _plot_adaptation(report: dict[str, Any], out_dir: Path, plt: Any) -> None:
    runs = {name: a["history"] for name, a in report.get("adaptation", {}).items() if a["history"]}
    if not runs:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, history in runs.items():
        window = max(1, len(history) // 20)
        smooth = [_mean(history[max(0, i - window + 1) : i + 1]) for i in range(len(history))]
        ax.plot(range(1, len(history) + 1), smooth, label=f"{name} (moving mean of {window})")
    ax.set_xlabel("step")
    ax.set_ylabel("Σ tasks mean prediction entropy")
    ax.set_title("AdaMerging: entropy on unlabelled test batches")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "adaptation_entropy.png", dpi=110)
    plt.close(fig)
