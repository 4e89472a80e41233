"""The analyses' quantities on inputs whose answers are known, and the analysis flows end to end
on tiny settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import prefect_harness

from mergeflow.analysis.soups import (
    averaged_template,
    feature_ensemble,
    greedy_soup,
    logit_ensemble,
    scale_state,
    templates,
    uniform_soup,
)
from mergeflow.analysis.spectra import (
    energy_share,
    interference,
    layer_type,
    reconstruction_error,
    right_singular_vectors,
    singular_values,
    task_vectors,
)
from mergeflow.analysis.task_vectors import analyze_task_vectors
from tests.helpers import LAYOUTS, random_state_dicts, write_set


def _rank(r: int, m: int = 12, n: int = 9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64)


def test_spectra_of_a_known_low_rank_matrix() -> None:
    stacked = torch.stack([_rank(3), _rank(3, seed=1)])
    values = singular_values(stacked)
    assert values.shape == (2, 9) and (values[:, 3:] < 1e-10 * values[:, :1]).all()
    assert torch.allclose(energy_share(values, [3, 9]), torch.ones(2, 2, dtype=torch.float64))
    assert energy_share(values, [1])[0, 0] < 1
    errors = reconstruction_error(values, [1, 2, 3, 9])
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-20 and errors[3] == 0


def test_interference_is_zero_for_orthogonal_and_one_for_identical_subspaces() -> None:
    eye = torch.eye(6, dtype=torch.float64)
    orthogonal = [eye[:3], eye[3:]]
    assert interference(orthogonal, [1, 2, 3]).abs().max() < 1e-12
    same = right_singular_vectors(torch.stack([_rank(4), 2 * _rank(4)]), 4)
    assert torch.allclose(interference(same, [4]), torch.ones(1, dtype=torch.float64))


def test_centred_vectors_sum_to_zero_and_uncentred_are_task_vectors() -> None:
    base = torch.randn(5, 4, dtype=torch.float64)
    tuned = [base + torch.randn(5, 4, dtype=torch.float64) for _ in range(3)]
    centred = task_vectors(base, tuned, centred=True)
    assert centred.sum(0).abs().max() < 1e-12
    assert torch.allclose(task_vectors(base, tuned, centred=False)[1], tuned[1] - base)


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("visual.transformer.resblocks.0.attn.in_proj_weight", "attn.qkv"),
        ("encoder.layer.3.attention.self.key.weight", "attn.qkv"),
        ("vision_model.encoder.layers.1.self_attn.out_proj.weight", "attn.out"),
        ("encoder.layer.3.intermediate.dense.weight", "mlp.in"),
        ("encoder.layer.3.output.dense.weight", "mlp.out"),
        ("encoder.layer.3.attention.output.dense.weight", "attn.out"),
        ("visual.transformer.resblocks.0.mlp.c_proj.weight", "mlp.out"),
        ("visual.proj", None),
        ("encoder.layer.3.output.LayerNorm.weight", None),
    ],
)
def test_layer_types(key: str, kind: str | None) -> None:
    assert layer_type(key) == kind


def test_task_vector_analysis_on_checkpoints(tmp_path: Path) -> None:
    base, tuned = random_state_dicts(LAYOUTS["hf_bert"](), tasks=3, seed=2, dtype=torch.float32)
    theta0, models = write_set(tmp_path, base, tuned)
    result = analyze_task_vectors(theta0, models, ratios=(0.1, 0.5, 1.0))
    assert set(result["layer_types"]) == {"attn.qkv", "attn.out", "mlp.in", "mlp.out"}
    body = result["layer_types"]["mlp.in"]
    assert body["matrices"] == 2
    for label in ("centred", "uncentred"):
        assert body[label]["energy"][-1] == pytest.approx(1.0) and body[label]["reconstruction"][-1] < 1e-12
        assert all(0 <= x <= 1 + 1e-9 for x in body[label]["interference"])


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(3, generator=g), "n": torch.tensor([7])}


def test_soups_and_ensembles() -> None:
    one = _state(0)
    soup = uniform_soup([one, one, one])
    assert all(torch.equal(soup[k], one[k]) for k in one)  # a soup of identical models is the model
    pair = uniform_soup([one, _state(1)])
    assert torch.allclose(pair["w"], (one["w"] + _state(1)["w"]) / 2)
    with pytest.raises(ValueError, match="non-float"):
        uniform_soup([one, {**_state(1), "n": torch.tensor([8])}])
    states = [_state(i) for i in range(4)]
    scores = {0: 0.5, 1: 0.9, 2: 0.1, 3: 0.7}

    def val(state) -> float:  # a soup scores the mean of its members' scores minus a penalty
        members = [i for i, s in enumerate(states) if torch.equal(s["w"], state["w"])]
        return scores[members[0]] if members else 0.0

    greedy, kept = greedy_soup(states, val)
    assert kept == [1] and torch.equal(greedy["w"], states[1]["w"])  # no mixture beats the best alone
    logits = [torch.randn(5, 3) for _ in range(3)]
    assert torch.allclose(logit_ensemble(logits), sum(logits) / 3)
    feats = [torch.randn(5, 4) for _ in range(2)]
    w, b = torch.randn(3, 4), torch.randn(3)
    assert torch.allclose(feature_ensemble(feats, w, b), ((feats[0] + feats[1]) / 2) @ w.T + b)
    scaled = scale_state(one, 100.0)
    assert torch.allclose(scaled["w"], 100 * one["w"]) and torch.equal(scaled["n"], one["n"])


def test_templates_are_min_max_normalised_rows() -> None:
    weight = torch.randn(3, 16)
    images = templates(weight, (4, 4))
    assert images.shape == (3, 4, 4)
    assert torch.allclose(images.amin(dim=(1, 2)), torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(images.amax(dim=(1, 2)), torch.ones(3, dtype=torch.float64))
    rank = images[1].flatten().argsort()
    assert torch.equal(rank, weight[1].argsort())  # an order-preserving map of the row
    assert torch.allclose(
        averaged_template(weight, 0, 2, (4, 4)), templates(((weight[0] + weight[2]) / 2)[None], (4, 4))[0]
    )


def test_vision_models_learn_their_task() -> None:
    from mergeflow.zoo.vision_data import digits, split_indices
    from mergeflow.zoo.vision_model import accuracy, make_classifier, predict, train

    data = digits()
    parts = split_indices(len(data.labels), {"train": 256, "test": 128}, 0)
    for arch, epochs in (("cnn", 3), ("vit-tiny", 8)):  # a ViT from scratch on 256 images learns slowly
        model = make_classifier(arch, 10, seed=0)
        before = accuracy(predict(model, data.images[parts["test"]]), data.labels[parts["test"]])
        train(model, data.images[parts["train"]], data.labels[parts["train"]], epochs=epochs, lr=3e-3, seed=0)
        after = accuracy(predict(model, data.images[parts["test"]]), data.labels[parts["test"]])
        assert after > before + 0.15, arch


def test_analysis_flows_on_tiny_settings(tmp_path: Path) -> None:
    import yaml
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows.analyses import ANALYSES

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "device": "cpu",
        "zoo": {"dir": str(tmp_path / "zoo"), "text_minilm": {"tasks": ["language", "emoji"], "train": 32,
                "validation": 16, "test": 32, "layers": 2, "max_length": 32}},
        "analysis": {
            "dir": str(tmp_path / "analysis"),
            "rank_curve": {"rank_ratios": [0.1, 0.5, 1.0], "scalings": [1.0, 2.0]},
            "vision": {"archs": ["cnn"], "pretrain_examples": 256, "pretrain_epochs": 0.5, "train": 64,
                       "validation": 64, "test": 64, "finetune_epochs": 1.0, "models": 3, "sizes": [2, 3],
                       "scale_sweep": [2.0, 100.0]},
        },
    }))  # fmt: skip
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "results"}), prefect_harness():
        results = {name: flow(params_file=str(params), track=False) for name, flow in ANALYSES.items()}
    root = tmp_path / "analysis"
    report = (root / "report.md").read_text()
    for name in ANALYSES:
        assert f"## {name}" in report and results[name]["summary"] in report
    for png in ("task-vectors/spectra.png", "task-vectors/interference.png", "rank-curve/rank_curve.png",
                "weight-templates/weight_templates.png", "soups/soups.png", "scaling/scaling.png"):  # fmt: skip
        assert (root / png).stat().st_size > 5000, png
    soups = json.loads((root / "soups" / "soups.json").read_text())[0]
    assert set(soups["by_n"]) == {"2", "3"} and len(soups["individual"]) == 3
    curve = json.loads((root / "rank-curve" / "rank_curve.json").read_text())["curve"]
    assert [p["rank_ratio"] for p in curve] == [0.1, 0.5, 1.0]
    full = curve[-1]  # full rank: CART is weight averaging whatever λ, so every scaling scores the same
    assert len(set(full["all_scalings"].values())) == 1


def test_seeded_fine_tunes_are_distinct_models_and_match_their_files(tmp_path: Path) -> None:
    from mergeflow.analysis.vision import VisionAnalysisConfig, pretrained_and_finetuned, task_splits
    from mergeflow.checkpoint import read_state_dict

    cfg = VisionAnalysisConfig(archs=("cnn",), pretrain_examples=128, pretrain_epochs=0.5, train=64, validation=16,
                               test=16, finetune_epochs=1.0, models=3)  # fmt: skip
    _, tuned = pretrained_and_finetuned("cnn", cfg, task_splits(cfg), tmp_path)
    assert not torch.equal(tuned[0]["tower.fc.weight"], tuned[1]["tower.fc.weight"])  # seeds differ
    for seed, state in enumerate(tuned):
        stored = read_state_dict(tmp_path / f"cnn-mnist5k-seed{seed}.safetensors")
        assert all(torch.equal(stored[k], state[k]) for k in state)


def test_task_vector_flow_on_an_acquired_manifest(tmp_path: Path) -> None:
    """The paper presets come as `mergeflow acquire` manifests; task-vectors runs on one."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows.analyses import task_vectors

    base, tuned = random_state_dicts(LAYOUTS["open_clip"](), tasks=3, seed=5, dtype=torch.float32)
    theta0, models = write_set(tmp_path / "store", base, tuned)
    manifest = tmp_path / "clip-like.json"
    manifest.write_text(json.dumps({"pretrained": str(theta0), "finetuned": [str(m) for m in models]}))
    params = tmp_path / "params.yaml"
    params.write_text(f"analysis: {{dir: {tmp_path / 'analysis'}}}\n")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "results"}), prefect_harness():
        result = task_vectors(params_file=str(params), track=False, manifest=str(manifest))
    stored = json.loads((tmp_path / "analysis" / "task-vectors" / "task_vectors.json").read_text())
    assert stored["tasks"] == 3 and set(stored["layer_types"]) == {"attn.qkv", "attn.out", "mlp.in", "mlp.out"}
    assert "attn.qkv" in result["summary"] and (tmp_path / "analysis" / "report.md").exists()
