"""Figures and Markdown summaries of the analyses; ``collect_report`` joins them into one report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergeflow.writer import write_text_atomic


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rank_curve_figure(result: dict[str, Any], out_dir: Path) -> str:
    plt = _plt()
    curve = result["curve"]
    ranks = [p["rank_ratio"] for p in curve]
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    ax.plot(ranks, [100 * p["validation_score"] for p in curve], marker="o", label="validation (best λ per rank)")
    ax.plot(ranks, [100 * p["test_normalized"] for p in curve], marker="s", label="test at that λ")
    ax.set_xscale("log")
    ax.set_xlabel("rank ratio k / min(m, n) (log scale)")
    ax.set_ylabel("normalised accuracy (%)")
    ax.set_title("CART on text-minilm: accuracy vs. rank")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "rank_curve.png", dpi=110)
    plt.close(fig)
    best = max(curve, key=lambda p: p["validation_score"])
    lines = ["| rank ratio | best λ (validation) | validation norm. | test norm. |", "|---|---|---|---|"]
    lines += [f"| {p['rank_ratio']:g} | {p['scaling']:g} | {100 * p['validation_score']:.1f} | "
              f"{100 * p['test_normalized']:.1f} |" for p in curve]  # fmt: skip
    return "\n".join(lines) + f"\n\nBest rank on validation: {best['rank_ratio']:g} (λ = {best['scaling']:g}).\n"


def task_vector_summary(result: dict[str, Any]) -> str:
    ratios = result["ratios"]
    pick = [r for r in (0.04, 0.12, 0.32) if r in ratios]
    lines = ["| layer type | vectors | " + " | ".join(f"energy@{r:g}" for r in pick) + " | "
             + " | ".join(f"interference@{r:g}" for r in pick) + " |", "|---" * (2 + 2 * len(pick)) + "|"]  # fmt: skip
    for kind, body in result["layer_types"].items():
        for label in ("centred", "uncentred"):
            energy = [body[label]["energy"][ratios.index(r)] for r in pick]
            inter = [body[label]["interference"][ratios.index(r)] for r in pick]
            lines.append(f"| {kind} | {label} | " + " | ".join(f"{100 * e:.1f}%" for e in energy) + " | "
                         + " | ".join(f"{i:.3f}" for i in inter) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def templates_figure(result: dict[str, Any], out_dir: Path) -> str:
    plt = _plt()
    names = list(result)
    columns = max(len(result[n]["templates"]) for n in names)
    fig, axes = plt.subplots(2 * len(names), columns, figsize=(1.1 * columns, 2.4 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        body = result[name]
        for col in range(columns):
            for r, images, titles in ((2 * row, body["templates"], body["classes"]),
                                      (2 * row + 1, body["pair_templates"], body["pairs"])):  # fmt: skip
                ax = axes[r][col]
                ax.axis("off")
                if col < len(images):
                    ax.imshow(images[col], cmap="gray")
                    title = (
                        titles[col]
                        if isinstance(titles[col], str)
                        else "+".join(body["classes"][i][:6] for i in titles[col])
                    )
                    ax.set_title(title[:15], fontsize=6)
    fig.suptitle("Linear classifiers on raw pixels: class templates (rows 1, 3) and averaged pairs (rows 2, 4)",
                 fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out_dir / "weight_templates.png", dpi=110)
    plt.close(fig)
    return "\n".join(f"- {n}: linear classifier accuracy train {100 * b['accuracy']['train']:.1f}%, "
                     f"test {100 * b['accuracy']['test']:.1f}%" for n, b in result.items()) + "\n"  # fmt: skip


SOUP_COLUMNS = ("individual_mean", "individual_best", "uniform_soup", "greedy_soup", "logit_ensemble",
                "feature_ensemble_head0", "feature_ensemble_mean_head")  # fmt: skip


def soups_figure(results: list[dict[str, Any]], out_dir: Path) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 3.6), squeeze=False)
    lines = []
    for ax, result in zip(axes[0], results, strict=True):
        sizes = list(result["by_n"])
        width = 0.8 / len(SOUP_COLUMNS)
        for i, column in enumerate(SOUP_COLUMNS):
            xs = [j + (i - (len(SOUP_COLUMNS) - 1) / 2) * width for j in range(len(sizes))]
            ax.bar(xs, [100 * result["by_n"][n][column] for n in sizes], width, label=column.replace("_", " "))
        low = min(100 * result["by_n"][n][c] for n in sizes for c in SOUP_COLUMNS)
        ax.set_ylim(max(0, low - 5), 100)
        ax.set_xticks(range(len(sizes)), [f"N = {n}" for n in sizes])
        ax.set_title(f"{result['arch']}: θ0 Fashion-MNIST → MNIST-5k", fontsize=9)
        ax.set_ylabel("test accuracy (%)")
        lines.append(f"**{result['arch']}**\n\n| N | " + " | ".join(c.replace("_", " ") for c in SOUP_COLUMNS)
                     + " |\n|---" * 1 + "|---" * len(SOUP_COLUMNS) + "|")  # fmt: skip
        for n in sizes:
            lines.append(f"| {n} | " + " | ".join(f"{100 * result['by_n'][n][c]:.1f}" for c in SOUP_COLUMNS) + " |")
        lines.append("")
    axes[0][-1].legend(fontsize=6, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(out_dir / "soups.png", dpi=110)
    plt.close(fig)
    return "\n".join(lines) + "\n"


def scaling_figure(results: list[dict[str, Any]], out_dir: Path) -> str:
    plt = _plt()
    cases = ("all", "only_model0", "all_but_model0")
    measures = ("model0", "uniform_soup", "logit_ensemble")
    fig, axes = plt.subplots(len(results), len(cases), figsize=(3.6 * len(cases), 2.9 * len(results)), squeeze=False)
    lines = []
    for row, result in zip(axes, results, strict=True):
        factors = list(result["factors"])
        for ax, case in zip(row, cases, strict=True):
            for measure in measures:
                ax.plot([float(f) for f in factors], [100 * result["factors"][f][case][measure] for f in factors],
                        marker="o", label=measure.replace("_", " "))  # fmt: skip
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_xscale("log")
            ax.set_title(f"{result['arch']}: scale {case.replace('_', ' ')}", fontsize=8)
            ax.set_xlabel("factor M", fontsize=8)
        row[0].set_ylabel("Δ test accuracy (points)", fontsize=8)
        base = result["baseline"]
        lines.append(f"**{result['arch']}** (baseline: model 0 {100 * base['model0']:.1f}, soup "
                     f"{100 * base['uniform_soup']:.1f}, ensemble {100 * base['logit_ensemble']:.1f}); "
                     f"change in points at M = {factors[-1]}:\n")  # fmt: skip
        lines.append("| scaled | model 0 | uniform soup | logit ensemble |\n|---|---|---|---|")
        for case in cases:
            d = result["factors"][factors[-1]][case]
            lines.append(f"| {case.replace('_', ' ')} | " + " | ".join(f"{100 * d[m]:+.1f}" for m in measures) + " |")
        lines.append("")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "scaling.png", dpi=110)
    plt.close(fig)
    return "\n".join(lines) + "\n"


def collect_report(root: str | Path) -> Path:
    """``report.md`` in ``root`` from every analysis folder's ``summary.md`` and figures."""
    root = Path(root)
    intro = ("Generated by `mergeflow analyze`; each section is one flow. The vision θ0 is a tiny model trained "
             "on Fashion-MNIST, not a foundation model.")  # fmt: skip
    parts = ["# mergeflow analyses", "", intro, ""]
    for folder in sorted(p for p in root.iterdir() if (p / "summary.md").exists()):
        meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").exists() else {}
        parts += [f"## {folder.name}", "", meta.get("about", ""), "", (folder / "summary.md").read_text(), ""]
        parts += [f"![{png.stem}]({folder.name}/{png.name})" for png in sorted(folder.glob("*.png"))] + [""]
    return write_text_atomic(root / "report.md", "\n".join(parts))
