"""The Rethink analyses on the offline vision models: weight templates of linear classifiers on raw
pixels, weight-space vs. feature/prediction-space averaging, and parameter scaling.

θ0 of each architecture is trained on Fashion-MNIST (not a foundation model); N models are then
fine-tuned from it on MNIST-5k with different seeds (same initialisation: θ0's tower and a linear
probe head fitted on θ0's features; only the batch order differs), as in model soups.
Every trained model is written with a fingerprint of its inputs and settings and reused on rerun.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from mergeflow.analysis.soups import (
    averaged_template,
    feature_ensemble,
    greedy_soup,
    logit_ensemble,
    scale_state,
    templates,
    uniform_soup,
)
from mergeflow.artefacts import artefact_fingerprint, is_current
from mergeflow.checkpoint import read_state_dict
from mergeflow.writer import save_state_dict
from mergeflow.zoo.vision_data import DATASETS, ImageSet, fashion_mnist, split_indices, to_inputs
from mergeflow.zoo.vision_model import accuracy, fit_linear_probe, make_classifier, predict, train

log = logging.getLogger("mergeflow.analysis")


class VisionAnalysisConfig(BaseModel):
    """``analysis.vision`` in params.yaml."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    archs: tuple[str, ...] = ("vit-tiny", "cnn")
    pretrain_examples: int = Field(20000, ge=64)
    pretrain_epochs: float = Field(2.0, gt=0)
    task: str = "mnist5k"
    train: int = Field(3000, ge=16)
    validation: int = Field(1000, ge=16)
    test: int = Field(1000, ge=16)
    finetune_epochs: float = Field(2.0, gt=0)
    lr: float = Field(1e-3, gt=0)
    models: int = Field(5, ge=2)
    sizes: tuple[int, ...] = (2, 3, 5)
    scale_sweep: tuple[float, ...] = (0.5, 2.0, 10.0, 100.0)
    template_datasets: tuple[str, ...] = ("fashion_mnist", "digits")
    seed: int = 0


def _fingerprint(record: dict[str, Any]) -> str:
    return artefact_fingerprint(record, __name__)


def _trained(path: Path, fingerprint: str, build: Any) -> dict[str, torch.Tensor]:
    """The state at ``path`` if its fingerprint matches, else ``build()`` written atomically."""
    if is_current(path, fingerprint):
        return read_state_dict(path)
    state = {k: v.detach().clone() for k, v in build().items()}  # a copy: build() may return live parameters
    save_state_dict(path, state, {"mergeflow.fingerprint": fingerprint})
    return state


def task_splits(cfg: VisionAnalysisConfig) -> dict[str, ImageSet]:
    data = DATASETS[cfg.task]()
    sizes = {"train": cfg.train, "validation": cfg.validation, "test": cfg.test}
    parts = split_indices(len(data.labels), sizes, cfg.seed)
    return {name: data.subset(index, f"{cfg.task}-{name}") for name, index in parts.items()}


def pretrained_and_finetuned(
    arch: str, cfg: VisionAnalysisConfig, splits: dict[str, ImageSet], out_dir: Path
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """θ0 (Fashion-MNIST) with a probe head for the task, and ``cfg.models`` fine-tunes (seeds 0..N-1)."""
    pre = fashion_mnist("train")
    index = split_indices(len(pre.labels), {"pre": cfg.pretrain_examples}, cfg.seed)["pre"]
    record = {"arch": arch, "data": pre.digest(), "n": cfg.pretrain_examples, "epochs": cfg.pretrain_epochs,
              "lr": cfg.lr, "seed": cfg.seed, "version": 1}  # fmt: skip

    def pretrain() -> dict[str, torch.Tensor]:
        model = make_classifier(arch, len(pre.classes), cfg.seed)
        start = time.perf_counter()
        losses = train(
            model, pre.images[index], pre.labels[index], epochs=cfg.pretrain_epochs, lr=cfg.lr, seed=cfg.seed
        )
        log.info("%s θ0 on Fashion-MNIST: %d steps in %.0f s, final loss %.3f", arch, len(losses),
                 time.perf_counter() - start, sum(losses[-20:]) / 20)  # fmt: skip
        return model.tower.state_dict()

    tower = _trained(out_dir / f"{arch}-theta0.safetensors", _fingerprint(record), pretrain)
    train_set = splits["train"]
    classes = len(train_set.classes)
    model = make_classifier(arch, classes, cfg.seed)
    model.tower.load_state_dict(tower)
    probe = fit_linear_probe(predict(model, train_set.images, "features"), train_set.labels, classes)
    model.head.load_state_dict(probe.state_dict())
    start_state = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = []
    for seed in range(cfg.models):
        fine = {**record, "theta0": _fingerprint(record), "task": train_set.digest(), "ft_seed": seed,
                "ft_epochs": cfg.finetune_epochs}  # fmt: skip

        def finetune(seed: int = seed) -> dict[str, torch.Tensor]:
            model.load_state_dict(start_state)
            train(model, train_set.images, train_set.labels, epochs=cfg.finetune_epochs, lr=cfg.lr, seed=1000 + seed)
            return model.state_dict()

        tuned.append(_trained(out_dir / f"{arch}-{cfg.task}-seed{seed}.safetensors", _fingerprint(fine), finetune))
    return start_state, tuned


class _Scorer:
    """Accuracy of state dicts of one architecture on fixed image sets."""

    def __init__(self, arch: str, classes: int):
        self.model = make_classifier(arch, classes)

    def load(self, state: dict[str, torch.Tensor]) -> _Scorer:
        self.model.load_state_dict(state)
        return self

    def logits(self, state: dict[str, torch.Tensor], images: ImageSet) -> torch.Tensor:
        return predict(self.load(state).model, images.images)

    def features(self, state: dict[str, torch.Tensor], images: ImageSet) -> torch.Tensor:
        return predict(self.load(state).model, images.images, "features")


def weight_vs_feature(
    arch: str, tuned: list[dict[str, torch.Tensor]], splits: dict[str, ImageSet], sizes: tuple[int, ...]
) -> dict[str, Any]:
    """Test accuracy of individual models, soups and ensembles for each N in ``sizes``."""
    scorer = _Scorer(arch, len(splits["test"].classes))
    test, val = splits["test"], splits["validation"]
    labels = test.labels
    logits = [scorer.logits(s, test) for s in tuned]
    feats = [scorer.features(s, test) for s in tuned]
    individual = [accuracy(x, labels) for x in logits]
    rows = {}
    for n in sizes:
        if n > len(tuned):
            continue
        members = tuned[:n]
        soup = uniform_soup(members)
        greedy, kept = greedy_soup(members, lambda s: accuracy(scorer.logits(dict(s), val), val.labels))
        mean_head_w = torch.stack([s["head.weight"] for s in members]).mean(0)
        mean_head_b = torch.stack([s["head.bias"] for s in members]).mean(0)
        rows[str(n)] = {
            "individual_mean": sum(individual[:n]) / n,
            "individual_best": max(individual[:n]),
            "uniform_soup": accuracy(scorer.logits(soup, test), labels),
            "greedy_soup": accuracy(scorer.logits(greedy, test), labels),
            "greedy_kept": kept,
            "logit_ensemble": accuracy(logit_ensemble(logits[:n]), labels),
            "feature_ensemble_head0": accuracy(
                feature_ensemble(feats[:n], members[0]["head.weight"], members[0]["head.bias"]), labels
            ),
            "feature_ensemble_mean_head": accuracy(feature_ensemble(feats[:n], mean_head_w, mean_head_b), labels),
        }
    return {"arch": arch, "individual": individual, "by_n": rows}


def scaling_study(
    arch: str, tuned: list[dict[str, torch.Tensor]], splits: dict[str, ImageSet], factors: tuple[float, ...]
) -> dict[str, Any]:
    """Accuracy change when every tensor is multiplied by M: of all models, of model 0 only, of all
    but model 0; measured for individual models, the uniform soup and the logit ensemble."""
    scorer = _Scorer(arch, len(splits["test"].classes))
    test = splits["test"]

    def measure(states: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        logits = [scorer.logits(s, test) for s in states]
        return {
            "model0": accuracy(logits[0], test.labels),
            "individual_mean": sum(accuracy(x, test.labels) for x in logits) / len(logits),
            "uniform_soup": accuracy(scorer.logits(uniform_soup(states), test), test.labels),
            "logit_ensemble": accuracy(logit_ensemble(logits), test.labels),
        }

    baseline = measure(tuned)
    results: dict[str, Any] = {"arch": arch, "baseline": baseline, "factors": {}}
    for factor in factors:
        cases = {
            "all": [scale_state(s, factor) for s in tuned],
            "only_model0": [scale_state(tuned[0], factor), *tuned[1:]],
            "all_but_model0": [tuned[0], *(scale_state(s, factor) for s in tuned[1:])],
        }
        results["factors"][str(factor)] = {
            case: {k: v - baseline[k] for k, v in measure(states).items()} for case, states in cases.items()
        }
    return results


def weight_template_study(
    datasets: tuple[str, ...], seed: int = 0, examples: int = 20000, l2: float = 1e-2
) -> dict[str, Any]:
    """Linear classifiers on raw pixels (L-BFGS logistic regression), their class templates and
    averaged pairs; returns templates as nested lists plus train/test accuracy."""
    out = {}
    for name in datasets:
        data = DATASETS[name]()
        n = min(examples, len(data.labels))
        parts = split_indices(len(data.labels), {"train": int(0.8 * n), "test": n - int(0.8 * n)}, seed)
        x = {k: to_inputs(data.images[v]).flatten(1) for k, v in parts.items()}
        y = {k: data.labels[v] for k, v in parts.items()}
        head = fit_linear_probe(x["train"], y["train"], len(data.classes), l2=l2)  # L2 smooths the templates
        with torch.no_grad():
            acc = {k: accuracy(head(x[k]), y[k]) for k in x}
        weight = head.weight.detach()
        pairs = [(i, (i + 1) % len(data.classes)) for i in range(0, len(data.classes), 2)]
        out[name] = {
            "classes": list(data.classes),
            "accuracy": acc,
            "templates": templates(weight, (28, 28)).tolist(),
            "pairs": [[i, j] for i, j in pairs],
            "pair_templates": [averaged_template(weight, i, j, (28, 28)).tolist() for i, j in pairs],
        }
    return out
