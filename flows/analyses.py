"""The papers' analyses as Prefect flows (``mergeflow analyze NAME``), one per figure family:

- ``task-vectors``: CART's spectra, energy share, row-space interference and reconstruction error of
  centred vs. uncentred task vectors (text zoo);
- ``rank-curve``: CART accuracy vs. rank ratio and scaling (text zoo, one grid basis);
- ``weight-templates``: Rethink (a), linear classifiers on raw pixels;
- ``soups``: Rethink (b), weight- vs. feature/prediction-space averaging for N models;
- ``scaling``: Rethink (c), parameters multiplied by M.

The expensive part of each is a task cached by the content of its inputs (zoo files, data,
settings, library code); figures, the Markdown report and MLflow logging are redone each run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.context import TaskRunContext

from mergeflow.analysis import figures
from mergeflow.codeid import code_identity
from mergeflow.config import RunConfig, load_config
from mergeflow.tracking import log_analysis, tracking_uri
from mergeflow.writer import write_text_atomic
from tasks.caching import content_key
from tasks.pipeline_tasks import build_zoo, zoo_content

ABOUT = {
    "task-vectors": "CART §3: singular spectra of centred (θt − θ_avg) and uncentred (θt − θ0) task vectors of the "
    "text zoo's attention/MLP matrices, their energy in the top k, the row-space interference between tasks' "
    "top-k subspaces and the reconstruction error Σt‖τt − SVD_k(τt)‖² (relative), against k / min(m, n).",
    "rank-curve": "CART's accuracy against the rank ratio (best scaling per rank on validation, then test), "
    "from one grid basis of the text zoo.",
    "weight-templates": "Rethink (a): rows of linear classifiers trained on raw pixels, as images (per-class "
    "min-max), and averaged pairs of rows.",
    "soups": "Rethink (b): N models fine-tuned from one θ0 (tiny ViT / small CNN trained on Fashion-MNIST) on "
    "MNIST-5k with different seeds: individual models, uniform and greedy soups, logit and feature ensembles.",
    "scaling": "Rethink (c): every tensor multiplied by M for all models, model 0 only, or all but model 0; "
    "change of test accuracy of model 0, the uniform soup and the logit ensemble.",
}


def _analysis_key(_: TaskRunContext, parameters: dict[str, Any]) -> str:
    return content_key(step="analysis", name=parameters["name"], inputs=parameters["inputs"])


@task(name="analysis", cache_key_fn=_analysis_key, persist_result=True)
def compute(name: str, inputs: dict[str, Any], run: Callable[[], Any]) -> Any:
    """The expensive part of one analysis; ``inputs`` (hashes, settings, code version) is its cache key."""
    return run()


def _zoo(cfg: RunConfig) -> dict[str, Any]:
    return build_zoo(str(cfg.zoo.dir), cfg.zoo.settings(), cfg.zoo.name)


def _finish(name: str, cfg: RunConfig, summary: str, params: dict[str, Any], metrics: dict[str, float],
            track: bool) -> dict[str, Any]:  # fmt: skip
    folder = Path(cfg.analysis.dir) / name
    write_text_atomic(folder / "summary.md", summary)
    write_text_atomic(folder / "meta.json", _json({"about": ABOUT[name], "params": params}))
    figures.collect_report(cfg.analysis.dir)
    run_id = log_analysis(name, folder, params, metrics, tracking_uri(cfg.tracking.uri)) if track else None
    return {"name": name, "dir": str(folder), "summary": summary, "mlflow_run": run_id}


@flow(name="task-vectors")
def task_vectors(
    params_file: str = "params.yaml", preset: str | None = None, track: bool = True, manifest: str | None = None
) -> dict[str, Any]:
    """On the configured zoo, or on any checkpoint set: a `mergeflow acquire` ``manifest`` (the
    paper presets: θ0 and the fine-tunes as acquired, e.g. CLIP ViT-B/32 with 8 task checkpoints)."""
    from mergeflow.analysis.task_vectors import analyze_task_vectors, write_task_vector_report
    from mergeflow.hashing import sha256_file_cached
    from mergeflow.manifest import read_manifest

    cfg = load_config(params_file, preset=preset)
    if manifest is None:
        zoo = _zoo(cfg)
        theta0, models = zoo["theta0"]["file"], [info["model"] for info in zoo["tasks"].values()]
        title, content = zoo.get("name", "zoo"), zoo_content(zoo)
    else:
        described = read_manifest(manifest)
        theta0, models = described.pretrained, described.finetuned
        title, content = Path(manifest).stem, {p: sha256_file_cached(p) for p in (theta0, *models)}
    inputs = {"checkpoints": content, "code": code_identity(analyze_task_vectors.__module__)}
    result = compute.with_options(name="analysis:task-vectors")(
        "task-vectors", inputs, lambda: analyze_task_vectors(theta0, models)
    )
    write_task_vector_report(result, Path(cfg.analysis.dir) / "task-vectors", title)
    body = result["layer_types"]
    metrics = {f"interference.{kind}.{label}.k12": body[kind][label]["interference"][result["ratios"].index(0.12)]
               for kind in body for label in ("centred", "uncentred") if 0.12 in result["ratios"]}  # fmt: skip
    return _finish("task-vectors", cfg, figures.task_vector_summary(result), {"checkpoints": title}, metrics, track)


@flow(name="rank-curve")
def rank_curve(params_file: str = "params.yaml", preset: str | None = None, track: bool = True) -> dict[str, Any]:
    from mergeflow.analysis.rank_curve import cart_rank_curve

    cfg = load_config(params_file, preset=preset)
    zoo = _zoo(cfg)
    settings = cfg.analysis.rank_curve
    out = cfg.report_path()
    inputs = {"zoo": zoo_content(zoo), "settings": settings.model_dump(mode="json"),
              "code": code_identity(cart_rank_curve.__module__)}  # fmt: skip
    result = compute.with_options(name="analysis:rank-curve")(
        "rank-curve", inputs,
        lambda: cart_rank_curve(cfg.zoo.dir, settings.rank_ratios, settings.scalings, out, cfg.device),
    )  # fmt: skip
    folder = Path(cfg.analysis.dir) / "rank-curve"
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "rank_curve.json", _json(result))
    summary = figures.rank_curve_figure(result, folder)
    metrics = {f"test_normalized.rank_{p['rank_ratio']:g}": p["test_normalized"] for p in result["curve"]}
    return _finish("rank-curve", cfg, summary, settings.model_dump(mode="json"), metrics, track)


def _vision_inputs(cfg: RunConfig) -> dict[str, Any]:
    from mergeflow.zoo.vision_data import DATASETS

    vision = cfg.analysis.vision
    names = {"fashion_mnist", vision.task, *vision.template_datasets}
    return {"settings": vision.model_dump(mode="json"), "data": {n: DATASETS[n]().digest() for n in sorted(names)},
            "code": code_identity("mergeflow.analysis.vision")}  # fmt: skip


@flow(name="weight-templates")
def weight_templates(params_file: str = "params.yaml", preset: str | None = None, track: bool = True) -> dict[str, Any]:
    from mergeflow.analysis.vision import weight_template_study

    cfg = load_config(params_file, preset=preset)
    vision = cfg.analysis.vision
    result = compute.with_options(name="analysis:weight-templates")(
        "weight-templates", _vision_inputs(cfg), lambda: weight_template_study(vision.template_datasets, vision.seed)
    )
    folder = Path(cfg.analysis.dir) / "weight-templates"
    folder.mkdir(parents=True, exist_ok=True)
    summary = figures.templates_figure(result, folder)
    metrics = {f"test_accuracy.{n}": b["accuracy"]["test"] for n, b in result.items()}
    return _finish("weight-templates", cfg, summary, {"datasets": ",".join(result)}, metrics, track)


def _per_arch(cfg: RunConfig, name: str, study: Callable[[str, list[Any], dict[str, Any]], Any]) -> list[Any]:
    """``study(arch, fine-tunes, splits)`` for each architecture, each a cached task; the fine-tunes
    are trained once and then read from disk."""
    from mergeflow.analysis.vision import pretrained_and_finetuned, task_splits

    results = []
    for arch in cfg.analysis.vision.archs:

        def run(arch: str = arch) -> Any:
            splits = task_splits(cfg.analysis.vision)
            folder = Path(cfg.analysis.dir) / "models"
            _, tuned = pretrained_and_finetuned(arch, cfg.analysis.vision, splits, folder)
            return study(arch, tuned, splits)

        step = compute.with_options(name=f"analysis:{name}:{arch}")
        results.append(step(f"{name}:{arch}", _vision_inputs(cfg), run))
    return results


@flow(name="soups")
def soups(params_file: str = "params.yaml", preset: str | None = None, track: bool = True) -> dict[str, Any]:
    from mergeflow.analysis.vision import weight_vs_feature

    cfg = load_config(params_file, preset=preset)
    vision = cfg.analysis.vision
    results = _per_arch(cfg, "soups", lambda arch, tuned, splits: weight_vs_feature(arch, tuned, splits, vision.sizes))
    folder = Path(cfg.analysis.dir) / "soups"
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "soups.json", _json(results))
    summary = figures.soups_figure(results, folder)
    metrics = {f"{r['arch']}.N{n}.{c}": v for r in results for n, row in r["by_n"].items() for c, v in row.items()
               if isinstance(v, float)}  # fmt: skip
    return _finish("soups", cfg, summary, vision.model_dump(mode="json"), metrics, track)


@flow(name="scaling")
def scaling(params_file: str = "params.yaml", preset: str | None = None, track: bool = True) -> dict[str, Any]:
    from mergeflow.analysis.vision import scaling_study

    cfg = load_config(params_file, preset=preset)
    vision = cfg.analysis.vision
    results = _per_arch(
        cfg, "scaling", lambda arch, tuned, splits: scaling_study(arch, tuned, splits, vision.scale_sweep)
    )
    folder = Path(cfg.analysis.dir) / "scaling"
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "scaling.json", _json(results))
    summary = figures.scaling_figure(results, folder)
    top = str(vision.scale_sweep[-1])
    metrics = {f"{r['arch']}.{case}.{m}.delta": v for r in results for case, d in r["factors"][top].items()
               for m, v in d.items()}  # fmt: skip
    return _finish("scaling", cfg, summary, vision.model_dump(mode="json"), metrics, track)


def _json(value: Any) -> str:
    return json.dumps(value, indent=1)


ANALYSES: dict[str, Callable[..., dict[str, Any]]] = {
    "task-vectors": task_vectors,
    "rank-curve": rank_curve,
    "weight-templates": weight_templates,
    "soups": soups,
    "scaling": scaling,
}
