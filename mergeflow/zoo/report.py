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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergeflow.engine import merge_checkpoints
from mergeflow.hashing import sha256_file
from mergeflow.methods import get_method, params_record, parse_params
from mergeflow.writer import write_text_atomic
from mergeflow.zoo.build import evaluate_checkpoint

log = logging.getLogger("mergeflow.report")


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
        self.data_key = hashlib.sha256("".join(t["data_sha256"] for t in zoo["tasks"].values()).encode()).hexdigest()

    def __call__(self, checkpoint: Path, split: str) -> dict[str, dict[str, float]]:
        key = hashlib.sha256(f"{sha256_file(checkpoint)}:{split}:{self.data_key}".encode()).hexdigest()
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


def select_method(
    zoo_dir: str | Path,
    method: str,
    base: Mapping[str, Any],
    grid: Mapping[str, list[Any]],
    out_dir: str | Path,
    individual: Mapping[str, Mapping[str, float]],
    criterion: str = "normalized",
    device: str = "auto",
) -> dict[str, Any]:
    """Merge every grid point of one method, score it on validation, test the best once.

    Returns the method's row and its sweep; only the chosen model stays on disk.
    """
    zoo_dir, out_dir = Path(zoo_dir), Path(out_dir)
    zoo = json.loads((zoo_dir / "zoo.json").read_text())
    evaluator = _Evaluator(zoo_dir, out_dir / "evaluations")
    tasks = evaluator.tasks
    theta0 = Path(zoo["theta0"]["file"])
    models = [Path(zoo["tasks"][t]["model"]) for t in tasks]
    spec = get_method(method)

    def scores(outputs: list[Path], split: str) -> dict[str, float]:
        if spec.per_task_outputs:  # each task scored with its own model
            return {t: _accuracies(evaluator(p, split), tasks)[t] for t, p in zip(tasks, outputs, strict=True)}
        return _accuracies(evaluator(outputs[0], split), tasks)

    def score(val: dict[str, float]) -> float:
        return (
            _normalized(val, dict(individual["validation"])) if criterion == "normalized" else _mean(list(val.values()))
        )

    tried = []
    for point in grid_points(base, grid):
        params = parse_params(method, point)
        tag = hashlib.sha256(json.dumps(params_record(params), sort_keys=True).encode()).hexdigest()[:12]
        target = out_dir / "merged" / (f"{method}-{tag}" if spec.per_task_outputs else f"{method}-{tag}.safetensors")
        result = merge_checkpoints(method, theta0, models, target, params, device=device)
        val = scores(result.outputs, "validation")
        tried.append({"params": params_record(params), "validation": val, "score": score(val),
                      "outputs": [str(p) for p in result.outputs]})  # fmt: skip
    best = max(tried, key=lambda r: r["score"])
    test = scores([Path(p) for p in best["outputs"]], "test")
    for other in tried:  # keep only the chosen model on disk; evaluations stay cached
        if other is not best:
            for p in map(Path, other["outputs"]):
                p.unlink(missing_ok=True)
    row = {"method": method, "params": best["params"], "validation": best["validation"], "test": test,
           "grid_points": len(tried), "outputs": best["outputs"]}  # fmt: skip
    return {"row": row, "sweep": tried}


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
        "theta0_sha256": zoo["theta0"]["sha256"],
        "tasks": tasks,
        "criterion": criterion,
        "rows": rows,
        "sweeps": {method: sel["sweep"] for method, sel in selections.items()},
    }
    write_text_atomic(out_dir / "results.json", json.dumps(report, indent=1))
    write_text_atomic(out_dir / "report.md", render(report) + "\n")
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
) -> dict[str, Any]:
    """Baselines, then every method's validation-selected row, then the assembled report."""
    start = time.perf_counter()
    baselines = evaluate_baselines(zoo_dir, out_dir)
    selections = {
        method: select_method(
            zoo_dir, method, base, grids.get(method, {}), out_dir, baselines["individual"], criterion, device
        )
        for method, base in methods.items()
    }
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
    ax.set_title("Merged MiniLM encoders, parameters chosen on validation")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy_by_task.png", dpi=110)
    plt.close(fig)
    cart = report["sweeps"].get("cart")
    if cart:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        scalings = sorted({p["params"]["scaling"] for p in cart})
        for s in scalings:
            pts = sorted((p["params"]["rank_ratio"], 100 * _mean(list(p["validation"].values()))) for p in cart
                         if p["params"]["scaling"] == s)  # fmt: skip
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"scaling {s}")
        ax.set_xlabel("rank ratio")
        ax.set_ylabel("mean validation accuracy (%)")
        ax.set_title("CART: accuracy vs. rank")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "cart_rank_curve.png", dpi=110)
        plt.close(fig)
