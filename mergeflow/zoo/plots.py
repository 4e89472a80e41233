"""Plots of a zoo report: per-task test accuracy of every merge, CART's validation score against
rank and its scaling × rank heatmap, every method's score against scaling, and AdaMerging's entropy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergeflow.zoo.selection import mean


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
    _plot_compression(report, out_dir, plt)


PLOTS = ("accuracy_by_task.png", "cart_rank_curve.png", "cart_grid_heatmap.png", "scaling_curves.png",
         "adaptation_entropy.png", "compression.png")  # fmt: skip


def rank_curve(report: dict[str, Any]) -> list[dict[str, float]]:
    """CART's best validation score (%) over the scalings at each rank ratio, by increasing rank."""
    best: dict[float, float] = {}
    for p in report["sweeps"].get("cart", []):
        r = p["params"]["rank_ratio"]
        best[r] = max(best.get(r, float("-inf")), 100 * p["score"])
    return [{"rank_ratio": r, "score": best[r]} for r in sorted(best)] if len(best) > 1 else []


def scaling_curves(report: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """Per method with more than one scaling in its grid: (λ, best validation score % at that λ)."""
    curves = {}
    for method, sweep in report["sweeps"].items():
        by_scaling: dict[float, float] = {}
        for p in sweep:
            if "scaling" in p["params"]:
                s = p["params"]["scaling"]
                by_scaling[s] = max(by_scaling.get(s, float("-inf")), 100 * p["score"])
        if len(by_scaling) > 1:
            curves[method] = sorted(by_scaling.items())
    return curves


def plot_series(report: dict[str, Any]) -> dict[str, list[dict[str, float]]]:
    """The curves as data series (``dvc plots`` overlays them across experiments): ``rank_curve`` and
    ``scaling/<method>``, each a list of points."""
    series: dict[str, list[dict[str, float]]] = {}
    curve = rank_curve(report)
    if curve:
        series["rank_curve"] = curve
    for method, points in scaling_curves(report).items():
        series[f"scaling/{method}"] = [{"scaling": x, "score": y} for x, y in points]
    return series


def _plot_grids(report: dict[str, Any], out_dir: Path, plt: Any) -> None:
    """CART: best validation score per rank (the bell-curve question) and the scaling × rank heatmap;
    every method: validation score against scaling."""
    cart = report["sweeps"].get("cart")
    if cart and len({p["params"]["rank_ratio"] for p in cart}) > 1:
        ranks = sorted({p["params"]["rank_ratio"] for p in cart})
        scalings = sorted({p["params"]["scaling"] for p in cart})
        score = {(p["params"]["rank_ratio"], p["params"]["scaling"]): 100 * p["score"] for p in cart}
        share = {(p["params"]["rank_ratio"], p["params"]["scaling"]): p.get("validation_share", 1.0) for p in cart}
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        best = rank_curve(report)
        ax.plot([p["rank_ratio"] for p in best], [p["score"] for p in best], marker="o", label="best scaling per rank")
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
        partial = False
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                part = share.get((ranks[j], scalings[i]), 1.0) < 1.0  # pruned by halving on part of validation
                partial |= part
                ax.text(j, i, f"{value:.1f}" + ("*" if part else ""), ha="center", va="center", fontsize=6,
                        color="white")  # fmt: skip
        ax.set_xlabel("rank ratio" + ("\n* scored on part of validation (successive halving)" if partial else ""))
        ax.set_ylabel("scaling λ")
        ax.set_title(f"CART validation score ({report['criterion']}, %)")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(out_dir / "cart_grid_heatmap.png", dpi=110)
        plt.close(fig)
    curves = scaling_curves(report)
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
        smooth = [mean(history[max(0, i - window + 1) : i + 1]) for i in range(len(history))]
        ax.plot(range(1, len(history) + 1), smooth, label=f"{name} (moving mean of {window})")
    ax.set_xlabel("step")
    ax.set_ylabel("Σ tasks mean prediction entropy")
    ax.set_title("AdaMerging: entropy on unlabelled test batches")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "adaptation_entropy.png", dpi=110)
    plt.close(fig)


def compression_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-task methods (with their recorded storage) and the best single merged model (no storage per
    task), best normalised accuracy first."""
    rows = [r for r in report["rows"] if "storage" in r]
    if not rows:
        return []
    singles = [r for r in report["rows"] if "storage" not in r and "params" in r and r.get("grid_points")]
    best = [max(singles, key=lambda r: r["normalized"])] if singles else []
    out = [{"method": r["method"], "per_task_bytes": r["storage"]["per_task_bytes"],
            "shared_bytes": r["storage"]["shared_bytes"], "normalized": r["normalized"]} for r in rows]  # fmt: skip
    out += [{"method": r["method"], "per_task_bytes": 0, "shared_bytes": None, "normalized": r["normalized"]}
            for r in best]  # fmt: skip
    return sorted(out, key=lambda r: -r["normalized"])


def _plot_compression(report: dict[str, Any], out_dir: Path, plt: Any) -> None:
    """Normalised test accuracy against MB stored per task (per-task methods; the best single merge at 0)."""
    rows = compression_rows(report)
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for row in rows:
        x, y = row["per_task_bytes"] / 1e6, 100 * row["normalized"]
        single = row["shared_bytes"] is None
        ax.scatter([x], [y], marker="s" if single else "o", color="black" if single else None)
        ax.annotate(row["method"] + (" (one model)" if single else ""), (x, y), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")  # fmt: skip
    ax.set_xlabel("stored per task beyond θ0 (MB)")
    ax.set_ylabel("normalised test accuracy (%)")
    ax.set_title("Per-task models: accuracy against storage")
    fig.tight_layout()
    fig.savefig(out_dir / "compression.png", dpi=110)
    plt.close(fig)
