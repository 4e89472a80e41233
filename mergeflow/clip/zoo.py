"""The ``clip`` zoo: a paper preset's CLIP image encoders (θ0 and one fine-tune per task, acquired and
verified by the artifact store), zero-shot heads from the CLIP text tower, and per task a data manifest
(validation = 10% of train, ≤ 5000, fixed seed; the dataset's own test split).

Layout of ``<dir>``::

    data/<task>.json   which examples form each split (indices into the dataset, labels, content digest)
    zoo.json           kind "clip": θ0, fine-tunes, heads (in the head cache), manifests, every hash

With the zoo built, the pipeline (baselines, grid selection, AdaMerging, report, MLflow) runs on it as
on any other zoo; :class:`ClipEvaluator` scores image-tower state dicts with the frozen heads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from mergeflow.artefacts import load_strict
from mergeflow.checkpoint import read_state_dict
from mergeflow.clip.datasets import Images, checked_labels, open_images, validation_split
from mergeflow.clip.heads import OpenClipText, cached_head
from mergeflow.clip.models import Preprocess, create_model
from mergeflow.clip.tasks import task_spec
from mergeflow.devices import resolve_device
from mergeflow.errors import ConfigError
from mergeflow.hashing import sha256_file_cached
from mergeflow.presets import get_preset
from mergeflow.sources import OpenClipSource, Source
from mergeflow.writer import write_text_atomic
from mergeflow.zoo.description import read_zoo, write_zoo
from mergeflow.zoo.evaluation import Evaluator, split_part

log = logging.getLogger("mergeflow.clip")
SPLITS = ("validation", "test")


class ClipZooConfig(BaseModel):
    """``zoo.clip`` in params.yaml. Checkpoints come from ``preset`` unless ``pretrained``/``finetuned``
    are given; the text tower (for the heads) from ``text`` (default: open_clip's ``openai`` weights)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    preset: str | None = "clip-vit-b32-8tasks"
    model: str | None = Field(None, description="open_clip architecture (default: the preset's)")
    pretrained: Source | None = None
    finetuned: tuple[Source, ...] = ()
    text: Source | None = None
    tasks: tuple[str, ...] = Field((), description="subset of the tasks (default: all of the preset's)")
    store: str = "data/store"
    from_dir: str | None = None
    data_root: str = "data/datasets"
    datasets: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-task loader overrides")
    head_cache: str = "data/heads"
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    validation_cap: int = Field(5000, ge=1)
    seed: int = 0
    max_validation: int | None = Field(None, ge=1, description="subsample validation (None: all of it)")
    max_test: int | None = Field(None, ge=1, description="subsample test (None: all; the papers use all)")
    hash_content: bool = Field(True, description="sha256 every image file (False: names and sizes only)")
    batch_size: int = Field(256, ge=1)
    workers: int = Field(4, ge=0, description="image-decoding processes")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache_images: Literal["validation", "all", "none"] = "validation"

    def resolved(self) -> tuple[str, Source, dict[str, Source], Source, list[str]]:
        """(architecture, θ0 source, fine-tune source per task, text-tower source, tasks)."""
        finetuned = {s.name: s for s in self.finetuned}
        pretrained, model = self.pretrained, self.model
        if self.preset is not None:
            preset = get_preset(self.preset)
            model = model or preset.model
            pretrained = pretrained or preset.pretrained
            finetuned = finetuned or {s.name: s for s in preset.finetuned}
        if model is None or pretrained is None or not finetuned:
            raise ConfigError("zoo.clip: give a preset, or model, pretrained and finetuned sources")
        tasks = list(self.tasks) or list(finetuned)
        missing = [t for t in tasks if t not in finetuned]
        if missing:
            raise ConfigError(f"zoo.clip: no fine-tune for tasks {missing}")
        for t in tasks:
            task_spec(t)  # unknown task names fail here
        text = self.text or OpenClipSource(name="clip-text", model=model, tag="openai", select_prefix="")
        return model, pretrained, finetuned, text, tasks

    def loader(self, task: str) -> dict[str, Any]:
        return {**task_spec(task).loader, **self.datasets.get(task, {})}


def _open(cfg: ClipZooConfig, task: str, split: str) -> Images:
    spec = task_spec(task)
    return open_images(cfg.loader(task), cfg.data_root, split, len(spec.classes), spec.folders, cfg.hash_content)


def _subsample(indices: list[int], limit: int | None, seed: int) -> list[int]:
    if limit is None or limit >= len(indices):
        return indices
    chosen = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))[:limit]
    return [indices[i] for i in sorted(chosen.tolist())]


def _task_data(cfg: ClipZooConfig, task: str) -> tuple[Images, Images, list[int], list[int], list[int]]:
    """(train, test, train labels, test labels, validation indices) of a task, labels checked."""
    classes = len(task_spec(task).classes)
    train, test = _open(cfg, task, "train"), _open(cfg, task, "test")
    train_labels = checked_labels(train, classes, f"{task} train")
    test_labels = checked_labels(test, classes, f"{task} test")
    _, val = validation_split(len(train), cfg.seed, cfg.validation_fraction, cfg.validation_cap)
    return train, test, train_labels, test_labels, val


def data_manifest(cfg: ClipZooConfig, task: str) -> dict[str, Any]:
    """Which examples form the task's validation and test splits, with labels and the data's digest."""
    train, test, train_labels, test_labels, val = _task_data(cfg, task)
    val = _subsample(val, cfg.max_validation, cfg.seed + 1)
    tst = _subsample(list(range(len(test))), cfg.max_test, cfg.seed + 2)
    return {
        "task": task,
        "loader": cfg.loader(task),
        "classes": len(task_spec(task).classes),
        "digest": {"train": train.digest(), "test": test.digest()},
        "sizes": {"train": len(train), "test": len(test)},
        "protocol": {"validation_fraction": cfg.validation_fraction, "validation_cap": cfg.validation_cap,
                     "seed": cfg.seed, "max_validation": cfg.max_validation, "max_test": cfg.max_test},
        "splits": {
            "validation": {"source": "train", "indices": val, "labels": [train_labels[i] for i in val]},
            "test": {"source": "test", "indices": tst, "labels": [test_labels[i] for i in tst]},
        },
    }  # fmt: skip


def data_digests(cfg: ClipZooConfig) -> dict[str, str]:
    """Content digest of every task's train and test data (what a rebuilt manifest would record)."""
    _, _, _, _, tasks = cfg.resolved()
    return {f"{t}/{split}": _open(cfg, t, split).digest() for t in tasks for split in ("train", "test")}


def check_data(cfg: ClipZooConfig) -> list[dict[str, Any]]:
    """Per task: where its data is read from and the split sizes it gives, or the one-line problem."""
    from mergeflow.errors import MergeflowError

    _, _, _, _, tasks = cfg.resolved()
    rows = []
    for task in tasks:
        loader = cfg.loader(task)
        where = (
            loader.get("path")
            or loader.get("repo")
            or str(Path(cfg.data_root) / str(loader.get("root", loader.get("train", ""))))
        )
        row: dict[str, Any] = {"task": task, "kind": loader.get("kind"), "where": where}
        try:
            train, test, _, _, val = _task_data(cfg, task)
            row |= {"train": len(train) - len(val), "validation": len(val), "test": len(test), "problem": ""}
        except MergeflowError as exc:
            row |= {"train": None, "validation": None, "test": None, "problem": str(exc)}
        rows.append(row)
    return rows


def build_clip_zoo(directory: str | Path, cfg: ClipZooConfig | None = None) -> dict[str, Any]:
    """Acquire the checkpoints, build (or reuse) every head and data manifest, write ``zoo.json``."""
    from mergeflow.store import ArtifactStore

    cfg = cfg or ClipZooConfig()
    root = Path(directory)
    start = time.perf_counter()
    model, pretrained, finetuned, text, tasks = cfg.resolved()
    store = ArtifactStore(cfg.store)
    artifacts = store.acquire_all([pretrained, *(finetuned[t] for t in tasks), text],
                                  Path(cfg.from_dir) if cfg.from_dir else None)  # fmt: skip
    theta0, models, text_file = artifacts[0], dict(zip(tasks, artifacts[1:-1], strict=True)), artifacts[-1]
    revision = sha256_file_cached(text_file.path)
    encoder: list[OpenClipText] = []

    def text_encoder() -> tuple[Any, float]:
        if not encoder:
            encoder.append(OpenClipText(model, text_file.path, resolve_device(cfg.device)))
        return encoder[0], encoder[0].logit_scale

    zoo: dict[str, Any] = {
        "name": "clip", "kind": "clip", "dir": str(root), "model": model, "preset": cfg.preset,
        "theta0": {"file": str(theta0.path), "sha256": sha256_file_cached(theta0.path), "source": theta0.source},
        "text": {"file": str(text_file.path), "sha256": revision, "source": text_file.source},
        "config": cfg.model_dump(mode="json"), "tasks": {},
    }  # fmt: skip
    for task in tasks:
        spec = task_spec(task)
        head, hit = cached_head(cfg.head_cache, model, revision, spec, text_encoder)
        manifest = data_manifest(cfg, task)
        data_path = root / "data" / f"{task}.json"
        text_out = json.dumps(manifest, indent=None, sort_keys=True)
        if not data_path.exists() or data_path.read_text() != text_out:
            write_text_atomic(data_path, text_out)
        zoo["tasks"][task] = {
            "classes": [c if isinstance(c, str) else c[0] for c in spec.classes], "model": str(models[task].path),
            "head": str(head),
            "data": str(data_path), "data_sha256": hashlib.sha256(text_out.encode()).hexdigest(),
            "source": models[task].source, "head_cached": hit,
        }  # fmt: skip
        sizes = [len(manifest["splits"][s]["indices"]) for s in SPLITS]
        log.info("%s: head %s, %d validation / %d test examples", task, "reused" if hit else "built", *sizes)
    write_zoo(root, zoo)
    log.info("clip zoo ready in %s (%.0f s)", root, time.perf_counter() - start)
    return zoo


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, images: Images, indices: list[int], preprocess: Preprocess):
        self.images, self.indices, self.preprocess = images, indices, preprocess

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess.geometry(self.images.image(self.indices[i]))


class ClipEvaluator(Evaluator):
    """Scores CLIP image-tower state dicts on every task of a clip zoo with its frozen zero-shot heads:
    logits = head · normalise(tower(x)); accuracy is top-1, loss the mean cross-entropy."""

    def __init__(self, zoo_dir: str | Path):
        self.zoo = read_zoo(zoo_dir)
        self.cfg = ClipZooConfig(**self.zoo["config"])
        self.tasks: list[str] = list(self.zoo["tasks"])
        self.tower = create_model(self.zoo["model"]).visual
        self.preprocess = Preprocess(self.tower)
        self.heads = {t: read_state_dict(info["head"])["weight"] for t, info in self.zoo["tasks"].items()}
        self.manifests = {t: json.loads(Path(info["data"]).read_text()) for t, info in self.zoo["tasks"].items()}
        self.device = resolve_device(self.cfg.device)
        self.to(self.device)
        self._sources: dict[tuple[str, str], Images] = {}
        self._cache: dict[tuple[str, str], torch.Tensor] = {}
        self._loaded: str | None = None

    def _source(self, task: str, split: str) -> Images:
        which = self.manifests[task]["splits"][split]["source"]
        if (task, which) not in self._sources:
            self._sources[(task, which)] = _open(self.cfg, task, which)
        return self._sources[(task, which)]

    def batches(self, task: str, split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 image batches and labels of a split or a fold of it (:func:`split_part`); a kept split
        (``cache_images``) is decoded whole once and its folds are slices of it."""
        name, fold, folds = split_part(split)
        entry = self.manifests[task]["splits"][name]
        labels = torch.tensor(entry["labels"])
        keep = self.cfg.cache_images == "all" or self.cfg.cache_images == name
        size = self.cfg.batch_size
        if keep and (task, name) not in self._cache:
            dataset = _Decoded(self._source(task, name), entry["indices"], self.preprocess)
            loader = torch.utils.data.DataLoader(dataset, batch_size=size, num_workers=self.cfg.workers)
            decoded = list(loader)
            self._cache[(task, name)] = torch.cat(decoded) if decoded else torch.empty(0, dtype=torch.uint8)
        labels = labels[fold::folds]
        if (task, name) in self._cache:
            images = self._cache[(task, name)][fold::folds]
            return [(images[i : i + size], labels[i : i + size]) for i in range(0, len(labels), size)]
        dataset = _Decoded(self._source(task, name), entry["indices"][fold::folds], self.preprocess)
        loader = torch.utils.data.DataLoader(dataset, batch_size=size, num_workers=self.cfg.workers)
        return [(x, labels[i * size : (i + 1) * size]) for i, x in enumerate(loader)]

    def load(self, state: Mapping[str, torch.Tensor], tag: str | None = None) -> None:
        if tag is not None and tag == self._loaded:
            return
        load_strict(self.tower, state, "the image tower")
        self._loaded = tag

    def features(self, images: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        x = self.preprocess.normalise(images.to(self.device))
        if params is None:
            out = self.tower(x)
        else:
            out = torch.func.functional_call(self.tower, dict(params), (x,), strict=False)
        return F.normalize(out, dim=-1)

    @property
    def module(self) -> torch.nn.Module:
        return self.tower

    def sample_unlabelled(self, task: str, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` random test images of ``task`` (uint8, preprocessed geometry; labels are not read)."""
        indices = self.manifests[task]["splits"]["test"]["indices"]
        chosen = torch.randint(len(indices), (count,), generator=generator).tolist()
        source = self._source(task, "test")
        return torch.stack([self.preprocess.geometry(source.image(indices[i])) for i in chosen])

    def logits_with(self, task: str, images: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.features(images, params) @ self.heads[task].T

    def to(self, device: torch.device) -> ClipEvaluator:
        self.device = torch.device(device)
        self.tower.to(self.device)
        self.heads = {t: h.to(self.device) for t, h in self.heads.items()}
        return self

    def scored(self, task: str, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.batches(task, split):
            yield self.features(images) @ self.heads[task].T, labels
