"""``mergeflow`` command line. Bad input ends with one ``mergeflow: error: ...`` line and exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mergeflow.errors import MergeflowError
from mergeflow.methods import get_method, method_names

log = logging.getLogger("mergeflow")


def parse_assignments(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are YAML scalars or lists (``0.3``, ``mean``, ``[0.3,0.5]``)."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise MergeflowError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise MergeflowError(f"--set {key}: cannot parse {raw!r} ({exc.__class__.__name__})") from None
        values[key.strip()] = tuple(value) if isinstance(value, list) else value
    return values


def methods_help() -> str:
    lines = ["methods and parameters (--set NAME=VALUE):"]
    for name in method_names():
        spec = get_method(name)
        lines.append(f"  {name}: {spec.summary}")
        lines.extend(f"      {line}" for line in spec.parameter_help())
    return "\n".join(lines)


def _cmd_merge(args: argparse.Namespace) -> int:
    from mergeflow.engine import merge_checkpoints

    if args.config:
        return _merge_recipe(args)
    if not args.method:
        raise MergeflowError("--method (or --config RECIPE) is required")
    pretrained, finetuned = _inputs(args)
    result = merge_checkpoints(
        args.method,
        pretrained,
        finetuned,
        args.output,
        parse_assignments(args.set),
        device=args.device,
        precision=args.precision or "float32",
        trust_pickle=args.trust_pickle,
        force=args.force,
        output_format=args.format,
        shard_size=args.shard_size,
        command=shlex.join(["mergeflow", *args.argv]),
        out_dtype=args.out_dtype,
        cast=args.cast,
    )
    for path in result.outputs:
        sys.stdout.write(f"{path}\n")
    return 0


def _merge_recipe(args: argparse.Namespace) -> int:
    """``merge --config RECIPE``: the recipe names the method, parameters, models and dtypes."""
    from mergeflow.engine import merge_checkpoints
    from mergeflow.recipe import read_recipe

    given = [flag for flag, value in (("--method", args.method), ("--pretrained", args.pretrained),
             ("--finetuned", args.finetuned), ("--manifest", args.manifest), ("--set", args.set)) if value]  # fmt: skip
    if given:
        raise MergeflowError(f"--config takes the method, models and parameters from the recipe; drop {given[0]}")
    recipe = read_recipe(args.config)
    for flag, ours, theirs in (("--precision", args.precision, recipe.precision),
                               ("--out-dtype", args.out_dtype, recipe.out_dtype)):  # fmt: skip
        if ours and theirs and ours != theirs:
            raise MergeflowError(f"{flag} {ours} contradicts the recipe's dtype ({theirs}) in {args.config}")
    result = merge_checkpoints(
        recipe.method,
        recipe.pretrained,
        recipe.finetuned,
        args.output,
        recipe.params,
        device=args.device,
        precision=args.precision or recipe.precision or "float32",
        trust_pickle=args.trust_pickle,
        force=args.force,
        output_format=args.format,
        shard_size=args.shard_size,
        command=shlex.join(["mergeflow", *args.argv]),
        out_dtype=args.out_dtype or recipe.out_dtype,
        cast=args.cast or recipe.cast,
        recipe=recipe.text,
    )
    for path in result.outputs:
        sys.stdout.write(f"{path}\n")
    return 0


def _cmd_adapt(args: argparse.Namespace) -> int:
    from mergeflow.adamerging import AdaMergingParams
    from mergeflow.adaptation import adapt_checkpoints, load_evaluator

    pretrained, finetuned = _inputs(args)
    try:
        params = AdaMergingParams(**parse_assignments(args.set))
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise MergeflowError(f"invalid AdaMerging parameters: {_pydantic_detail(exc)}") from None
    options = parse_assignments(args.evaluator_option)
    evaluator = load_evaluator(args.evaluator, options)
    evaluator_id = json.dumps({"evaluator": args.evaluator, "options": options}, sort_keys=True, default=str)
    result = adapt_checkpoints(pretrained, finetuned, evaluator, params, args.output, evaluator_id=evaluator_id,
                               device=args.device)  # fmt: skip
    history = result["history"]
    if history:
        sys.stdout.write(f"entropy {history[0]:.4f} -> {history[-1]:.4f} over {len(history)} steps\n")
    sys.stdout.write(f"{result['output']}\n")
    return 0


def _pydantic_detail(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors())


def _inputs(args: argparse.Namespace) -> tuple[str, list[str]]:
    """θ0 and the fine-tunes from --pretrained/--finetuned or --manifest."""
    if args.manifest:
        if args.pretrained or args.finetuned:
            raise MergeflowError("give either --manifest or --pretrained/--finetuned, not both")
        from mergeflow.manifest import read_manifest

        manifest = read_manifest(args.manifest)
        return manifest.pretrained, manifest.finetuned
    if not (args.pretrained and args.finetuned):
        raise MergeflowError("--pretrained and --finetuned (or --manifest) are required")
    return args.pretrained, list(args.finetuned)


def _cmd_example(args: argparse.Namespace) -> int:
    from mergeflow.synthetic import write_example_checkpoints

    paths = write_example_checkpoints(args.output, args.model, args.tasks, seed=args.seed)
    sys.stdout.write(f"{paths.pretrained}\n")
    for path in paths.finetuned:
        sys.stdout.write(f"{path}\n")
    return 0


def _cmd_acquire(args: argparse.Namespace) -> int:
    from mergeflow.config import load_config
    from mergeflow.presets import get_preset
    from mergeflow.store import ArtifactStore

    cfg = load_config(args.params).acquire
    preset_name = args.preset or cfg.preset
    store = ArtifactStore(args.store or cfg.store)
    for key in args.repin:
        store.unpin(key)
    from_dir = Path(args.from_dir) if args.from_dir else None
    lines = []
    if preset_name:
        preset = get_preset(preset_name)
        artifacts = store.acquire_all([preset.pretrained, *preset.finetuned], from_dir)
        manifest = {
            "preset": preset.name,
            "checkpoint_set": preset.checkpoint_set,
            "pretrained": str(artifacts[0].path),
            "finetuned": [str(a.path) for a in artifacts[1:]],
            "tasks": preset.tasks,
            "sha256": {a.name: a.sha256 for a in artifacts},
        }
        target = store.root / "manifests" / f"{preset.name}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(manifest, indent=2))
        lines.append(f"manifest: {target}  (mergeflow merge --manifest {target} ...)")
    else:
        artifacts = []
    artifacts += store.acquire_all(list(cfg.sources), from_dir)
    if not preset_name and not cfg.sources:
        raise MergeflowError("nothing to acquire: give --preset or list sources under acquire: in params.yaml")
    lines = [f"{a.name}\t{a.sha256}\t{a.path}" for a in artifacts] + lines
    if args.dvc:
        lines.append(f"tracked: {store.track_with_dvc()}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from mergeflow.presets import PRESETS, get_preset

    if args.name:
        preset = get_preset(args.name)
        sys.stdout.write(yaml.safe_dump(preset.model_dump(mode="json"), sort_keys=False))
    else:
        for preset in PRESETS.values():
            sys.stdout.write(f"{preset.name}: {preset.description}\n")
    return 0


def _cmd_zoo_build(args: argparse.Namespace) -> int:
    from mergeflow.config import load_config
    from mergeflow.zoo.registry import build_zoo

    cfg = load_config(args.params, preset=args.preset).zoo
    zoo = build_zoo(cfg.name, args.dir or cfg.dir, cfg.settings())
    sys.stdout.write(f"{Path(args.dir or cfg.dir) / 'zoo.json'}\n")
    for name, info in zoo["tasks"].items():
        sys.stdout.write(f"{name}\t{len(info['classes'])} classes\t{info['model']}\n")
    return 0


def _cmd_zoo_check(args: argparse.Namespace) -> int:
    from mergeflow.clip.zoo import ClipZooConfig, check_data
    from mergeflow.config import load_config

    cfg = load_config(args.params, preset=args.preset).zoo
    if cfg.name != "clip":
        raise MergeflowError(f"zoo {cfg.name!r} builds its data from packages; check applies to the clip zoo")
    rows = check_data(ClipZooConfig(**cfg.settings()))
    sys.stdout.write("| task | source | train | validation | test | problem |\n|---|---|---|---|---|---|\n")
    for r in rows:
        sizes = " | ".join("-" if r[k] is None else str(r[k]) for k in ("train", "validation", "test"))
        sys.stdout.write(f"| {r['task']} | {r['kind']}: {r['where']} | {sizes} | {r['problem']} |\n")
    return 2 if any(r["problem"] for r in rows) else 0


def _cmd_zoo_evaluate(args: argparse.Namespace) -> int:
    from mergeflow.config import load_config
    from mergeflow.zoo.registry import evaluate_checkpoint

    zoo_dir = args.dir or load_config(args.params).zoo.dir
    results = evaluate_checkpoint(zoo_dir, args.checkpoint, args.split)
    lines = [f"| task | accuracy ({args.split}) | loss |", "|---|---|---|"]
    lines += [f"| {task} | {r['accuracy']:.3f} | {r['loss']:.3f} |" for task, r in results.items()]
    mean = sum(r["accuracy"] for r in results.values()) / len(results)
    lines.append(f"| mean | {mean:.3f} | |")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _cmd_zoo_report(args: argparse.Namespace) -> int:
    from mergeflow.config import load_config
    from mergeflow.zoo.job import zoo_report
    from mergeflow.zoo.report import render

    cfg = load_config(args.params, preset=args.preset)
    started = time.time()
    zoo_dir = Path(args.dir or cfg.zoo.dir)
    out_dir = Path(args.output) if args.output else (zoo_dir / "report" if args.dir else cfg.report_path())
    report = zoo_report(
        zoo_dir, cfg.methods, cfg.selection.grids, out_dir,
        criterion=cfg.selection.criterion, device=cfg.device, adaptation=cfg.adaptation,
        halving=cfg.selection.schedule(),
    )  # fmt: skip
    sys.stdout.write(render(report) + "\n")
    if not args.no_mlflow:
        from mergeflow.tracking import TrackingContext, log_report, tracking_uri

        uri = tracking_uri(cfg.tracking.uri)
        context = TrackingContext(started_at=started, preset=cfg.preset, config=cfg.model_dump(mode="json"),
                                  models=cfg.tracking.models)  # fmt: skip
        run_id = log_report(report, out_dir, uri, context)
        sys.stdout.write(f"MLflow run {run_id} at {uri}\n")
    return 0


def _quiet_offline_services() -> None:
    """No telemetry calls from Prefect's local server or MLflow (they fail loudly offline)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    # Prefect's local (ephemeral) server gets 20 s to start by default: on a busy 2-core machine that
    # is not always enough, and the run then dies before any work with a timeout traceback.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def _run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--set`` and ``--dask`` as overrides of params.yaml, validated with the preset before any work."""
    from mergeflow.config import load_config

    overrides = parse_assignments(args.set)
    if args.dask:
        overrides["dask_address"] = args.dask
    load_config(args.params, overrides, args.preset)
    return overrides


def _cmd_run(args: argparse.Namespace) -> int:
    _quiet_offline_services()
    overrides = _run_overrides(args)  # bad parameters are reported before Prefect starts anything
    if not args.force and _up_to_date(args, overrides):
        return 0
    from flows.pipeline import pipeline

    result = pipeline(params_file=args.params, overrides=overrides, preset=args.preset, track_mlflow=not args.no_mlflow)
    sys.stdout.write(result["table"] + "\n")
    for step, state in result["steps"].items():
        sys.stdout.write(f"{step}: {state}\n")
    if result["mlflow_run"]:
        sys.stdout.write(f"MLflow run: {result['mlflow_run']}\n")
    return 0


def _up_to_date(args: argparse.Namespace, overrides: dict[str, Any]) -> bool:
    """Print the last run's table and say so when nothing it depends on changed (flows.uptodate)."""
    from flows.uptodate import current_record
    from mergeflow.config import load_config
    from mergeflow.tracking import tracking_uri

    cfg = load_config(args.params, overrides, args.preset)
    record = current_record(cfg, None if args.no_mlflow else tracking_uri(cfg.tracking.uri))
    if record is None:
        return False
    sys.stdout.write(record["table"] + "\n")
    tracked = f", MLflow run {record['mlflow_run']}" if record["mlflow_run"] else ""
    sys.stdout.write(
        f"up to date: nothing changed since the run that finished {record['finished_at']} "
        f"(Prefect flow run {record['flow_run_id']}{tracked}); --force runs the flow again\n"
    )
    return True


def _cmd_analyze(args: argparse.Namespace) -> int:
    _quiet_offline_services()
    from flows.analyses import ANALYSES
    from mergeflow.config import load_config

    cfg = load_config(args.params, preset=args.preset)  # bad parameters are reported before any work
    names = list(ANALYSES) if args.name == "all" else [args.name]
    if args.manifest and names != ["task-vectors"]:
        raise MergeflowError("--manifest applies to task-vectors only (the others need a zoo's data)")
    for name in names:
        extra = {"manifest": args.manifest} if args.manifest else {}
        result = ANALYSES[name](params_file=args.params, preset=args.preset, track=not args.no_mlflow, **extra)
        sys.stdout.write(f"## {name} ({result['dir']})\n{result['summary']}\n")
    sys.stdout.write(f"report: {Path(cfg.analysis.dir) / 'report.md'}\n")
    return 0


SERVE_NEEDS_SERVER = (
    "mergeflow serve needs a Prefect server (on the ephemeral API schedules never fire): run `prefect server start` "
    "and set PREFECT_API_URL=http://127.0.0.1:4200/api (or point PREFECT_API_URL at your team's server)"
)


def _prefect_server() -> str:
    """The configured Prefect API, checked to answer; a one-line error when none is configured or it is down."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise MergeflowError(SERVE_NEEDS_SERVER)
    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        raise MergeflowError(f"Prefect API at {url} does not answer ({failure.__class__.__name__}): is the server up?")
    return url


def _cmd_serve(args: argparse.Namespace) -> int:
    _quiet_offline_services()
    url = _prefect_server()
    overrides = _run_overrides(args)
    from prefect import serve

    from flows.pipeline import nightly_deployment

    if args.interval is not None and not args.interval > 0:
        raise MergeflowError(f"--interval {args.interval:g}: expected a positive number of seconds")
    try:
        deployment = nightly_deployment(
            str(Path(args.params).resolve()), args.preset, overrides, args.cron, args.interval, args.name
        )
    except ValueError as exc:  # the schedule's own validation (pydantic's ValidationError is a ValueError)
        given = f"--cron {args.cron!r}" if args.interval is None else f"--interval {args.interval:g}"
        raise MergeflowError(f"{given}: not a valid schedule ({_pydantic_detail(exc)})") from None
    log.info("serving deployment %s of mergeflow-pipeline against %s", args.name, url)
    serve(deployment)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mergeflow.demo import run_demo

    run_demo(args.params, args.output)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergeflow", description="Training-free merging of fine-tuned checkpoints.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser(
        "merge",
        help="merge a pretrained checkpoint and fine-tunes into one checkpoint",
        epilog=methods_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument("--method", choices=method_names(), metavar="NAME")
    merge.add_argument(
        "--config",
        metavar="RECIPE",
        help="a YAML recipe (mergekit's format, plus mergeflow's methods): docs/recipes.md",
    )
    merge.add_argument("--pretrained", metavar="PATH", help="θ0: .safetensors, .pt/.bin, shard index or model dir")
    merge.add_argument("--finetuned", nargs="+", metavar="PATH", help="θ1 ... θT")
    merge.add_argument("--manifest", metavar="FILE", help="θ0 and fine-tunes from a `mergeflow acquire` manifest")
    merge.add_argument(
        "--output", required=True, metavar="PATH", help="output file (a directory for cart_indexing and --format hf)"
    )
    merge.add_argument(
        "--format", default="safetensors", choices=("safetensors", "hf"),
        help="safetensors: one file; hf: a Hugging Face model directory (shards, index, θ0's config and "
        "tokenizer files, model card)",
    )  # fmt: skip
    merge.add_argument(
        "--shard-size", default="5GB", metavar="SIZE", help="largest shard of --format hf (e.g. 500MB, 5GB, 2GiB)"
    )
    merge.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method parameter")
    merge.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    merge.add_argument("--precision", choices=("float32", "float64"), help="compute dtype (default float32)")
    merge.add_argument(
        "--out-dtype", choices=("float32", "float64", "float16", "bfloat16"),
        help="dtype of every float tensor written (default: each key's dtype in θ0)",
    )  # fmt: skip
    merge.add_argument(
        "--cast",
        action="store_true",
        help="accept fine-tunes whose float keys have another dtype than θ0's (converted)",
    )
    merge.add_argument("--trust-pickle", action="store_true", help="allow .pt files that unpickle arbitrary objects")
    merge.add_argument("--force", action="store_true", help="recompute even if the output is up to date")
    merge.set_defaults(func=_cmd_merge)

    adapt = sub.add_parser(
        "adapt",
        help="AdaMerging on your own checkpoints: coefficients learned on your evaluator's unlabelled batches",
        description="The evaluator is PACKAGE.MODULE:FACTORY; FACTORY(**options) returns an object with tasks, "
        "module, sample_unlabelled(task, count, generator) and logits_with(task, inputs, params) "
        "(see mergeflow/adaptation.py). Parameters (--set): over, steps, lr, init, clip, batch_size, seed, rank_ratio.",
    )
    adapt.add_argument("--pretrained", metavar="PATH", help="θ0")
    adapt.add_argument("--finetuned", nargs="+", metavar="PATH", help="θ1 ... θT, in the evaluator's task order")
    adapt.add_argument("--manifest", metavar="FILE", help="θ0 and fine-tunes from a `mergeflow acquire` manifest")
    adapt.add_argument("--evaluator", required=True, metavar="MODULE:FACTORY")
    adapt.add_argument("--evaluator-option", action="append", default=[], metavar="KEY=VALUE")
    adapt.add_argument("--output", required=True, metavar="PATH")
    adapt.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="AdaMerging parameter")
    adapt.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    adapt.set_defaults(func=_cmd_adapt)

    example = sub.add_parser("example", help="write small synthetic θ0 + fine-tunes (open_clip or BERT shapes)")
    example.add_argument("--output", required=True, metavar="DIR")
    example.add_argument("--model", default="vit-tiny", help="vit-tiny | vit-b-32 | bert-tiny")
    example.add_argument("--tasks", type=int, default=4)
    example.add_argument("--seed", type=int, default=0)
    example.set_defaults(func=_cmd_example)

    acquire = sub.add_parser("acquire", help="fetch, verify, convert and store checkpoints (a preset or sources)")
    acquire.add_argument("--preset", metavar="NAME", help="see `mergeflow presets`")
    acquire.add_argument("--params", default="params.yaml", metavar="FILE", help="acquire: section (store, sources)")
    acquire.add_argument("--store", metavar="DIR", help="store root (default: acquire.store in params.yaml)")
    acquire.add_argument("--from-dir", metavar="DIR", help="files provided by hand (offline machines)")
    acquire.add_argument(
        "--repin", action="append", default=[], metavar="SOURCE",
        help="drop the pin of SOURCE (identity or unambiguous name) in lock.json: fetch, verify and pin it anew",
    )  # fmt: skip
    acquire.add_argument("--dvc", action="store_true", help="dvc add the store afterwards")
    acquire.set_defaults(func=_cmd_acquire)

    presets = sub.add_parser("presets", help="list presets, or show one in full")
    presets.add_argument("name", nargs="?")
    presets.set_defaults(func=_cmd_presets)

    zoo = sub.add_parser("zoo", help="model zoos: text-minilm, vision-tiny, clip (zoo.name in params.yaml)")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    build = zoo_sub.add_parser("build", help="build (or resume) the zoo: data, heads, fine-tunes")
    build.add_argument("--params", default="params.yaml", metavar="FILE")
    build.add_argument("--preset", metavar="NAME", help="a run preset (presets/NAME.yaml overlay)")
    build.add_argument("--dir", metavar="DIR", help="default: zoo.dir in params.yaml")
    build.set_defaults(func=_cmd_zoo_build)
    check = zoo_sub.add_parser("check", help="clip zoo: is every task's dataset where it should be? (split sizes)")
    check.add_argument("--params", default="params.yaml", metavar="FILE")
    check.add_argument("--preset", metavar="NAME", help="a run preset (e.g. clip-vit-b32-8tasks)")
    check.set_defaults(func=_cmd_zoo_check)
    ev = zoo_sub.add_parser("evaluate", help="accuracy of a checkpoint on every zoo task")
    ev.add_argument("checkpoint", metavar="PATH")
    ev.add_argument("--split", default="test", choices=("train", "validation", "test"))
    ev.add_argument("--params", default="params.yaml", metavar="FILE")
    ev.add_argument("--dir", metavar="DIR", help="default: zoo.dir in params.yaml")
    ev.set_defaults(func=_cmd_zoo_evaluate)

    report_help = "every method with parameters chosen on validation, AdaMerging, test once; table + plots (no Prefect)"
    for parent in (zoo_sub, sub):  # `mergeflow report` and `mergeflow zoo report` are the same command
        rep = parent.add_parser("report", help=report_help)
        rep.add_argument("--params", default="params.yaml", metavar="FILE")
        rep.add_argument("--preset", metavar="NAME", help="a run preset (presets/NAME.yaml overlay)")
        rep.add_argument("--dir", metavar="DIR", help="default: zoo.dir in params.yaml")
        rep.add_argument("--output", metavar="DIR", help="default: <zoo dir>/report")
        rep.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
        rep.set_defaults(func=_cmd_zoo_report)

    run = sub.add_parser("run", help="the whole pipeline as a Prefect flow (cached steps, MLflow tracking)")
    run.add_argument("--params", default="params.yaml", metavar="FILE")
    run.add_argument("--no-mlflow", action="store_true")
    run.add_argument("--preset", metavar="NAME", help="overlay presets/NAME.yaml on params.yaml (quick, paper-recipe)")
    run.add_argument("--dask", metavar="ADDRESS", help="run tasks on a Dask cluster: tcp://host:8786, or 'local'")
    run.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override params.yaml: methods.cart.scaling=1.5"
    )
    run.add_argument(
        "--force", action="store_true",
        help="run the flow even when nothing changed since the last finished run (its steps still come from the cache)",
    )  # fmt: skip
    run.set_defaults(func=_cmd_run)
    analyze = sub.add_parser("analyze", help="the papers' analyses as Prefect flows (figures, report, MLflow)")
    analyze.add_argument(
        "name", choices=("task-vectors", "rank-curve", "weight-templates", "soups", "scaling", "all"),
        help="task-vectors, rank-curve (CART); weight-templates, soups, scaling (Rethink); all",
    )  # fmt: skip
    analyze.add_argument("--params", default="params.yaml", metavar="FILE")
    analyze.add_argument("--preset", metavar="NAME", help="a run preset (presets/NAME.yaml overlay)")
    analyze.add_argument("--no-mlflow", action="store_true")
    analyze.add_argument(
        "--manifest", metavar="FILE", help="task-vectors on a `mergeflow acquire` manifest (e.g. a paper preset)"
    )
    analyze.set_defaults(func=_cmd_analyze)
    serve = sub.add_parser(
        "serve", help="serve a scheduled deployment of the pipeline on a Prefect server (default: cron 0 2 * * *)",
        description="Needs a Prefect server: `prefect server start` and PREFECT_API_URL=http://127.0.0.1:4200/api "
        "(or a team server). Runs start here, one per report directory at a time.",
    )  # fmt: skip
    serve.add_argument("--params", default="params.yaml", metavar="FILE")
    serve.add_argument("--preset", metavar="NAME", help="a run preset every run of the deployment uses")
    serve.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override params.yaml")
    serve.add_argument("--dask", metavar="ADDRESS", help="run tasks on a Dask cluster: tcp://host:8786, or 'local'")
    when = serve.add_mutually_exclusive_group()
    when.add_argument("--cron", default="0 2 * * *", metavar="CRON", help="schedule (default: 0 2 * * *, nightly)")
    when.add_argument(
        "--interval", type=float, metavar="SECONDS", help="run every SECONDS instead, the first run 10 s after serving"
    )
    serve.add_argument("--name", default="nightly", help="deployment name (default: nightly)")
    serve.set_defaults(func=_cmd_serve)

    demo = sub.add_parser("demo", help="a 3-second merge of synthetic example checkpoints with every method")
    demo.add_argument("--params", default="params.yaml", metavar="FILE")
    demo.add_argument("--output", default="out/demo", metavar="DIR")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Prefect's API client logs every request
    logging.getLogger("mergeflow").setLevel(logging.WARNING if args.quiet else logging.INFO)  # also what Prefect gets
    try:
        return args.func(args)
    except MergeflowError as exc:
        sys.stderr.write(f"mergeflow: error: {exc}\n")
        return 2
    except OSError as exc:  # anything the library did not already turn into one line
        where = f"{exc.filename}: " if exc.filename else ""
        sys.stderr.write(f"mergeflow: error: {where}{exc.strerror or exc}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
