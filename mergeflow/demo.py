"""The offline demo: synthetic example checkpoints merged with every configured method.

Writes ``<output>/checkpoints`` (θ0 and fine-tunes), ``<output>/models`` (one merge per method),
``results.json``, ``metrics.json`` (for ``dvc metrics``), ``report.md`` and ``alignment.png``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from mergeflow.checkpoint import CheckpointError, SafetensorsReader
from mergeflow.config import RunConfig, load_config
from mergeflow.engine import merge_checkpoints
from mergeflow.methods import get_method, params_record
from mergeflow.retention import task_vector_alignment
from mergeflow.synthetic import ExamplePaths, write_example_checkpoints
from mergeflow.writer import write_text_atomic

log = logging.getLogger("mergeflow.demo")


def _example_set(directory: Path, cfg: RunConfig) -> ExamplePaths:
    """Reuse example checkpoints already written with the same model, task count and seed."""
    tag = f"{cfg.demo.model} seed={cfg.demo.seed}"
    pretrained = directory / "pretrained.safetensors"
    finetuned = [directory / f"task{t:02d}.safetensors" for t in range(cfg.demo.tasks)]
    try:
        if all(SafetensorsReader(p).metadata.get("mergeflow.synthetic") == tag for p in (pretrained, *finetuned)):
            log.info("example checkpoints in %s are up to date", directory)
            return ExamplePaths(pretrained, finetuned)
    except CheckpointError:
        pass
    log.info("writing %d synthetic %s fine-tunes to %s", cfg.demo.tasks, cfg.demo.model, directory)
    return write_example_checkpoints(directory, cfg.demo.model, cfg.demo.tasks, seed=cfg.demo.seed)


def render_table(rows: list[dict]) -> str:
    tasks = len(rows[0]["cosine"]) if rows else 0
    head = (
        "| method | parameters | seconds | "
        + " | ".join(f"cos τ{t + 1}" for t in range(tasks))
        + " | mean cos | ‖Δ‖/‖mean τ‖ |"
    )
    lines = [head, "|" + "---|" * (tasks + 5)]
    for row in rows:
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items() if k not in ("exclude", "svd_solver")) or "–"
        cos = " | ".join(f"{c:.3f}" for c in row["cosine"])
        cells = [
            row["method"],
            params,
            f"{row['seconds']:.2f}",
            cos,
            f"{row['mean_cosine']:.3f}",
            f"{row['norm_ratio']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_alignment(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = len(rows[0]["cosine"])
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(rows), 3.6))
    width = 0.8 / tasks
    for t in range(tasks):
        xs = [i + (t - (tasks - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [r["cosine"][t] for r in rows], width, label=f"task {t + 1}")
    ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("cos(θ_merged − θ0, τt)")
    ax.set_title("What each merge keeps of each task vector (synthetic checkpoints)")
    ax.legend(fontsize=7, ncol=min(tasks, 4))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def run_demo(params_path: str | Path = "params.yaml", output: str | Path = "out/demo") -> list[dict]:
    cfg = load_config(params_path)
    output = Path(output)
    example = _example_set(output / "checkpoints", cfg)
    rows = []
    for name, params in cfg.method_params().items():
        spec = get_method(name)
        target = output / "models" / (name if spec.per_task_outputs else f"{name}.safetensors")
        result = merge_checkpoints(
            name, example.pretrained, example.finetuned, target, params, device=cfg.device, precision=cfg.precision
        )
        if spec.per_task_outputs:  # each task's own model, scored against its own task vector
            per_task = [task_vector_alignment(example.pretrained, example.finetuned, p) for p in result.outputs]
            cosine = [stats["cosine"][t] for t, stats in enumerate(per_task)]
            norm_ratio = sum(s["norm_ratio"] for s in per_task) / len(per_task)
        else:
            stats = task_vector_alignment(example.pretrained, example.finetuned, result.outputs[0])
            cosine, norm_ratio = stats["cosine"], stats["norm_ratio"]
        rows.append(
            {
                "method": name,
                "params": params_record(params),
                "seconds": result.seconds,
                "cached": result.skipped,
                "outputs": [str(p) for p in result.outputs],
                "cosine": cosine,
                "mean_cosine": sum(cosine) / len(cosine),
                "norm_ratio": norm_ratio,
            }
        )
    table = render_table(rows)
    inputs = {"model": cfg.demo.model, "tasks": cfg.demo.tasks, "seed": cfg.demo.seed}
    write_text_atomic(output / "results.json", json.dumps({"inputs": inputs, "rows": rows}, indent=2))
    write_text_atomic(
        output / "metrics.json", json.dumps({r["method"]: {"mean_cosine": r["mean_cosine"]} for r in rows}, indent=2)
    )
    note = (
        f"Synthetic `{cfg.demo.model}` checkpoints ({cfg.demo.tasks} tasks, seed {cfg.demo.seed}): random θ0 and "
        "task vectors built as shared + task-specific low-rank + noise. Not trained models: the columns "
        "show weight-space alignment, not accuracy.\n\n"
    )
    write_text_atomic(output / "report.md", "# mergeflow demo\n\n" + note + table + "\n\n![alignment](alignment.png)\n")
    plot_alignment(rows, output / "alignment.png")
    log.info("results (also in %s):\n%s", output / "report.md", table)
    return rows
