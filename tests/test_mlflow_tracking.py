"""MLflow tracking of a tiny text-zoo report, on a real ``mlflow server`` over HTTP (artifacts
proxied) and on a SQLite file: every merged model a logged model of its method's run, the champion
registered and fetched by alias with the bytes the merge wrote, dataset inputs hashed from the
files, the resolved configuration, run name, start time, headline metrics and lineage tags."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from servers import mlflow_server

from mergeflow.lineage import git_state
from mergeflow.mlflow_models import champion_row, registered_name
from mergeflow.tracking import TrackingContext, log_report

STARTED = 1_764_000_000.0  # 2025-11-24 16:00 UTC: the work's start, given by the caller
CONFIG = {"zoo": {"name": "text-minilm", "text_minilm": {"layers": 2}}, "methods": {"cart": {"scaling": 1.5}}}


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real MLflow server, starting while the tiny report is built (call it for its URL)."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as ready:
        yield ready


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """Two single merged models and one per-task method (two files) on a 2-layer, 2-task zoo."""
    from mergeflow.zoo.job import zoo_report
    from mergeflow.zoo.text_zoo import TextZooConfig, build_text_zoo

    root = tmp_path_factory.mktemp("tiny")
    cfg = TextZooConfig(tasks=("language", "emoji"), train=32, validation=16, test=32, layers=2, max_length=32)
    build_text_zoo(root / "zoo", cfg)
    methods = {"weight_average": {}, "task_arithmetic": {"scaling": 0.3}, "cart_indexing": {"rank_ratio": 0.25}}
    grids = {"task_arithmetic": {"scaling": [0.3, 1.0]}}
    return zoo_report(root / "zoo", methods, grids, root / "report"), root / "report"


def _download_champion(uri: str, zoo: str, folder: Path) -> Path:
    import mlflow

    mlflow.set_tracking_uri(uri)
    return Path(mlflow.artifacts.download_artifacts(f"models:/{registered_name(zoo)}@champion", dst_path=str(folder)))


def test_report_on_a_real_server(server: Any, tiny_report: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    report, out = tiny_report
    server = server()
    zoo = json.loads((Path(report["zoo"]) / "zoo.json").read_text())
    steps = {"build-zoo": "Cached", "select:cart": "Cached"}
    context = TrackingContext(started_at=STARTED, preset="quick", config=CONFIG, flow_run_id="flow-1", steps=steps)
    before = time.time()
    parent_id = log_report(report, out, uri=server, context=context)
    client = MlflowClient(server)
    parent = client.get_run(parent_id)
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.name == "mergeflow/text-minilm"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    from flows.pipeline import mlflow_run_url  # the link in the Prefect artifact, from the real server

    page = f"{server}/#/experiments/{experiment.experiment_id}/runs/{parent_id}?workflowType=machine_learning"
    assert mlflow_run_url(server, parent_id) == page

    # what ran, when: the run covers the work from the caller's start
    assert parent.info.run_name == "text-minilm · quick · 2025-11-24 16:00 UTC"
    assert parent.info.start_time == int(STARTED * 1000) and parent.info.end_time >= int(before * 1000)
    tags, params = parent.data.tags, parent.data.params
    assert tags["prefect.flow_run_id"] == "flow-1" and tags["mergeflow.cached"] == "true"
    assert tags["mergeflow.step.select_cart"] == "Cached" and tags["git.dirty"] in ("true", "false")
    assert params["config.methods.cart.scaling"] == "1.5" and params["config.zoo.text_minilm.layers"] == "2"
    config_file = Path(client.download_artifacts(parent_id, "config.json", str(tmp_path)))
    assert json.loads(config_file.read_text()) == CONFIG

    # lineage from the files themselves, as tags and as dataset inputs (digest: MLflow's 36 characters)
    theta0 = zoo["theta0"]["file"]
    assert tags["theta0.sha256"] == sha256(theta0) == zoo["theta0"]["sha256"]
    assert tags["finetuned.emoji.sha256"] == sha256(zoo["tasks"]["emoji"]["model"])
    assert tags["data.emoji.sha256"] == sha256(zoo["tasks"]["emoji"]["data"])
    datasets = {d.dataset.name: d for d in parent.inputs.dataset_inputs}
    assert {"theta0", "finetuned/language", "finetuned/emoji", "emoji/validation", "emoji/test"} <= set(datasets)
    assert datasets["theta0"].dataset.digest == sha256(theta0)[:36]
    assert json.loads(datasets["theta0"].dataset.profile)["sha256"] == sha256(theta0)
    assert {t.key: t.value for t in datasets["emoji/test"].tags} == {"mlflow.data.context": "test"}
    manifest = json.loads(Path(zoo["tasks"]["emoji"]["data"]).read_text())
    split = hashlib.sha256(json.dumps(manifest["splits"]["test"], sort_keys=True, ensure_ascii=False).encode())
    assert json.loads(datasets["emoji/test"].dataset.profile)["sha256"] == split.hexdigest()

    # every merged model is a logged model of its method's run, with the bytes the merge wrote
    rows = {r["method"]: r for r in report["rows"]}
    children = {
        c.info.run_name: c
        for c in client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    }
    for method in ("weight_average", "task_arithmetic", "cart_indexing"):
        (output,) = children[method].outputs.model_outputs
        model = client.get_logged_model(output.model_id)
        files = {Path(p).name: sha256(p) for p in rows[method]["outputs"]}
        assert {k.removeprefix("file.").removesuffix(".sha256"): v for k, v in model.tags.items()
                if k.startswith("file.")} == files  # fmt: skip
        assert (
            model.source_run_id == children[method].info.run_id and model.params.keys() == rows[method]["params"].keys()
        )
    assert len(rows["cart_indexing"]["outputs"]) == 2
    assert not children["zero-shot (θ0)"].outputs.model_outputs

    # the champion: the best single merged model by normalised test accuracy, fetched by alias
    best = max((r for r in report["rows"] if len(r.get("outputs", [])) == 1), key=lambda r: r["normalized"])
    assert parent.data.metrics["test.normalized"] == pytest.approx(best["normalized"])
    assert parent.data.metrics["test.mean"] == pytest.approx(best["mean"])
    version = client.get_model_version_by_alias(registered_name("text-minilm"), "champion")
    wrote = sha256(best["outputs"][0])
    assert version.tags["method"] == best["method"] and json.loads(version.tags["params"]) == best["params"]
    assert version.tags["model.sha256"] == wrote and version.tags["theta0.sha256"] == sha256(theta0)
    assert version.tags["finetuned.language.sha256"] == sha256(zoo["tasks"]["language"]["model"])
    assert children[best["method"]].data.tags["mergeflow.model.sha256"] == wrote
    assert version.run_id == children[best["method"]].info.run_id
    assert version.source == f"models:/{children[best['method']].outputs.model_outputs[0].model_id}"
    assert [f"models:/{o.model_id}" for o in client.get_run(parent_id).outputs.model_outputs] == [version.source]
    fetched = _download_champion(server, "text-minilm", tmp_path / "champion")
    (file,) = [p for p in fetched.rglob("*") if p.is_file()]
    assert sha256(file) == wrote

    # logged again with a step computed: the same logged models (no upload) and the same registered
    # version (no new one for the same files, method and parameters); child runs span their steps
    models = client.search_logged_models([experiment.experiment_id])
    spans = {"select:task_arithmetic": (STARTED + 10.0, STARTED + 70.5), "baselines": (STARTED + 1.0, STARTED + 9.0)}
    context = TrackingContext(steps={**steps, "select:cart": "Completed"}, spans=spans)
    again = log_report(report, out, uri=server, context=context)
    assert client.get_run(again).data.tags["mergeflow.cached"] == "false"
    assert {m.model_id for m in client.search_logged_models([experiment.experiment_id])} == {m.model_id for m in models}
    name = registered_name("text-minilm")
    assert client.get_model_version_by_alias(name, "champion").version == version.version
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    found = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{again}'")
    rerun = {c.info.run_name: c.info for c in found}

    def span(name: str) -> tuple[int, int]:
        return rerun[name].start_time, rerun[name].end_time

    assert span("task_arithmetic") == (int((STARTED + 10) * 1000), int((STARTED + 70.5) * 1000))
    assert span("zero-shot (θ0)") == (int((STARTED + 1) * 1000), int((STARTED + 9) * 1000))
    assert rerun["task_arithmetic"].status == "FINISHED"
    assert client.get_run(rerun["task_arithmetic"].run_id).data.tags["mlflow.source.name"]  # MLflow's own tags

    # another champion (other parameters): a new version, and the alias moves to it
    changed = {**report, "rows": [{**r, "params": {**r["params"], "scaling": 9.0}} if r["method"] == best["method"]
                                  else r for r in report["rows"]]}  # fmt: skip
    log_report(changed, out, uri=server)
    moved = client.get_model_version_by_alias(name, "champion")
    assert int(moved.version) == int(version.version) + 1 and json.loads(moved.tags["params"])["scaling"] == 9.0


def test_report_on_sqlite_logs_the_champion_only(tiny_report: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    """``tracking.models: champion``: one upload; the store's artifacts sit beside its database."""
    from mlflow.tracking import MlflowClient

    report, out = tiny_report
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent_id = log_report(report, out, uri=uri, context=TrackingContext(models="champion"))
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    assert "mergeflow.cached" not in parent.data.tags and parent.data.params["models_logged"] == "champion"
    assert client.get_experiment(parent.info.experiment_id).artifact_location == (tmp_path / "mlartifacts").as_uri()
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    logged = {c.info.run_name for c in children if c.outputs.model_outputs}
    best = champion_row(report)
    assert logged == {best["method"]}
    fetched = _download_champion(uri, "text-minilm", tmp_path / "champion")
    (file,) = [p for p in fetched.rglob("*") if p.is_file()]
    assert sha256(file) == sha256(best["outputs"][0])


def test_champion_is_the_best_single_model_under_the_criterion() -> None:
    def row(method: str, mean: float, normalized: float, outputs: int) -> dict[str, Any]:
        return {
            "method": method,
            "mean": mean,
            "normalized": normalized,
            "outputs": [f"{method}{i}" for i in range(outputs)],
        }

    rows = [row("zero-shot", 0.9, 0.9, 0), row("per-task", 0.95, 0.99, 2), row("a", 0.7, 0.8, 1),
            row("b", 0.8, 0.7, 1), row("c", 0.7, 0.8, 1)]  # fmt: skip
    assert champion_row({"rows": rows, "criterion": "normalized"})["method"] == "a"  # the first of a tie
    assert champion_row({"rows": rows, "criterion": "absolute"})["method"] == "b"
    assert champion_row({"rows": rows[:2], "criterion": "normalized"}) is None
    assert registered_name("Text MiniLM/8") == "mergeflow-text-minilm-8"


def test_git_state_reports_commit_and_dirty_tree(tmp_path: Path) -> None:
    assert git_state(tmp_path) == ("unknown", None)  # not a checkout

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    (tmp_path / "a.txt").write_text("a")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "a")
    commit = git("rev-parse", "HEAD").strip()
    assert git_state(tmp_path) == (commit, False)
    (tmp_path / "a.txt").write_text("b")
    assert git_state(tmp_path) == (commit, True)
