"""The zoo registry: one entry per zoo maps its name to its typed settings, its builder, the
digest of the packaged data it is built from, and its evaluator.

A zoo's ``zoo.json`` names it (``"name"``); everything that must know which zoo it holds asks here,
so adding a zoo means one new module and one entry below. The evaluation helpers at the bottom
(:func:`evaluator_for`, :func:`evaluate_checkpoint`) work on any registered zoo.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from mergeflow.checkpoint import read_state_dict
from mergeflow.clip.zoo import ClipEvaluator, ClipZooConfig, build_clip_zoo, data_digests
from mergeflow.errors import ConfigError
from mergeflow.hashing import sha256_files_cached
from mergeflow.zoo.description import read_zoo
from mergeflow.zoo.evaluation import Evaluator
from mergeflow.zoo.text_data import source_hashes
from mergeflow.zoo.text_evaluator import TextEvaluator
from mergeflow.zoo.text_zoo import TextZooConfig, build_text_zoo
from mergeflow.zoo.vision_data import source_files
from mergeflow.zoo.vision_zoo import VisionEvaluator, VisionZooConfig, build_vision_zoo


@dataclass(frozen=True)
class Zoo:
    """A registered zoo: settings model, builder, data digest of its sources, evaluator."""

    name: str
    config: type[BaseModel]
    build: Callable[[Path, Any], dict[str, Any]]
    sources: Callable[[Any], dict[str, str]]
    evaluator: Callable[[Path], Evaluator]


ZOOS: dict[str, Zoo] = {
    "text-minilm": Zoo("text-minilm", TextZooConfig, build_text_zoo,
                       lambda cfg: source_hashes(cfg.tasks), TextEvaluator),
    "vision-tiny": Zoo("vision-tiny", VisionZooConfig, build_vision_zoo,
                       lambda cfg: sha256_files_cached(source_files(cfg.tasks)), VisionEvaluator),
    "clip": Zoo("clip", ClipZooConfig, build_clip_zoo, data_digests, ClipEvaluator),
}  # fmt: skip


def get_zoo(name: str) -> Zoo:
    try:
        return ZOOS[name]
    except KeyError:
        raise ConfigError(f"unknown zoo {name!r}; known: {', '.join(ZOOS)}") from None


def build_zoo(name: str, directory: str | Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Build (or resume) the zoo ``name`` in ``directory`` with its settings from params.yaml."""
    zoo = get_zoo(name)
    return zoo.build(Path(directory), zoo.config(**settings))


def zoo_sources(name: str, settings: dict[str, Any]) -> dict[str, str]:
    """sha256 of every packaged file the zoo's data is read from (part of its cache key); for ``clip``
    the content digest of each task's train and test data (file hashes cached by stat)."""
    zoo = get_zoo(name)
    return zoo.sources(zoo.config(**settings))


def make_evaluator(zoo_dir: str | Path) -> Evaluator:
    """A new evaluator of the zoo in ``zoo_dir``, chosen by the name its ``zoo.json`` records."""
    return get_zoo(read_zoo(zoo_dir).get("name", "text-minilm")).evaluator(Path(zoo_dir))


_local = threading.local()


def evaluator_for(zoo_dir: str | Path) -> Evaluator:
    """This thread's evaluator for ``zoo_dir`` (rebuilt when the zoo's description changes)."""
    key = hashlib.sha256((Path(zoo_dir) / "zoo.json").read_bytes()).hexdigest() + str(Path(zoo_dir).resolve())
    cache: dict[str, Evaluator] = getattr(_local, "cache", None) or {}
    if key not in cache:
        cache.clear()  # one zoo at a time per thread: an encoder is ~90 MB
        cache[key] = make_evaluator(zoo_dir)
        _local.cache = cache
    return cache[key]


def evaluate_checkpoint(
    zoo_dir: str | Path, checkpoint: str | Path, split: str = "test"
) -> dict[str, dict[str, float]]:
    """Accuracy and loss of one (merged) checkpoint on every task of the zoo, with its frozen heads."""
    return evaluator_for(zoo_dir).evaluate(read_state_dict(checkpoint), split)
