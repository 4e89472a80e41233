"""AdaMerging on a built zoo (text or vision): coefficients learned on unlabelled batches of each
task's *test* examples (the transductive protocol of AdaMerging; labels are never read), then the adapted model is
evaluated like every other merge.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from mergeflow.adamerging import AdaMergingParams, adamerge, adaptation_vectors
from mergeflow.checkpoint import read_state_dict, stored_fingerprint
from mergeflow.codeid import code_identity
from mergeflow.devices import resolve_device
from mergeflow.hashing import sha256_file_cached
from mergeflow.writer import save_state_dict
from mergeflow.zoo.evalcache import EvaluationCache
from mergeflow.zoo.registry import make_evaluator, read_zoo

log = logging.getLogger("mergeflow.adapt")


def adapt_zoo(
    zoo_dir: str | Path, name: str, params: AdaMergingParams, out_dir: str | Path, device: str = "auto"
) -> dict[str, Any]:
    """Run one AdaMerging variant on the zoo (on CUDA when ``device`` resolves to it); returns its
    report row, loss curve and coefficients.

    The adapted model is written atomically with a fingerprint of everything that determines it,
    so a rerun with the same inputs loads it instead of training again.
    """
    zoo_dir, out_dir = Path(zoo_dir), Path(out_dir)
    zoo = read_zoo(zoo_dir)
    tasks = list(zoo["tasks"])
    theta0 = Path(zoo["theta0"]["file"])
    models = [Path(zoo["tasks"][t]["model"]) for t in tasks]
    record = {
        "params": params.model_dump(mode="json"),
        "theta0": sha256_file_cached(theta0),
        "models": [sha256_file_cached(m) for m in models],
        "data": [zoo["tasks"][t]["data_sha256"] for t in tasks],
        "code": code_identity(__name__),
    }
    fingerprint = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    target = out_dir / "merged" / f"{name}-{fingerprint[:12]}.safetensors"
    start = time.perf_counter()
    if stored_fingerprint(target) == fingerprint:
        log.info("%s: %s is up to date, not adapting again", name, target)
        meta = _read_meta(target)
        history, coefficients, seconds = meta["history"], meta["coefficients"], meta["seconds"]
    else:
        base = read_state_dict(theta0)
        anchor, vectors = adaptation_vectors(params, base, [read_state_dict(m) for m in models])
        where = resolve_device(device)
        anchor = {k: v.to(where) for k, v in anchor.items()}
        vectors = [{k: v.to(where) for k, v in vector.items()} for vector in vectors]
        engine = make_evaluator(zoo_dir).to(where)
        engine.module.eval()  # no dropout: the entropy is the deployed model's
        for parameter in engine.module.parameters():
            parameter.requires_grad_(False)

        def task_logits(state: dict[str, torch.Tensor], _: int, generator: torch.Generator) -> list[torch.Tensor]:
            batches = [(t, engine.sample_unlabelled(t, params.batch_size, generator)) for t in tasks]
            return [engine.logits_with(task, batch, state) for task, batch in batches]  # labels never read

        merged, lam, history = adamerge(anchor, vectors, task_logits, params)
        coefficients = {k: [round(float(x), 6) for x in v] for k, v in lam.items()}
        seconds = time.perf_counter() - start
        state = {k: (merged[k].to("cpu", v.dtype) if k in merged else v) for k, v in base.items()}
        record_out = {"history": history, "coefficients": coefficients, "seconds": seconds, "inputs": record}
        meta = {
            "mergeflow.fingerprint": fingerprint,
            "mergeflow.method": name,
            "mergeflow.adaptation": json.dumps(record_out),
        }
        save_state_dict(target, state, meta)
    evaluator = EvaluationCache(zoo_dir, out_dir / "evaluations")
    scores = {
        split: {t: r["accuracy"] for t, r in evaluator(target, split).items()} for split in ("validation", "test")
    }
    row = {"method": name, "params": params.model_dump(mode="json"), "validation": scores["validation"],
           "test": scores["test"], "outputs": [str(target)], "grid_points": 0}  # fmt: skip
    log.info("%s: adaptation took %.0f s, final entropy %.4f", name, seconds, history[-1] if history else float("nan"))
    return {"row": row, "history": history, "coefficients": coefficients, "tasks": tasks, "seconds": seconds}


def _read_meta(path: Path) -> dict[str, Any]:
    from mergeflow.checkpoint import open_checkpoint

    with open_checkpoint(path) as reader:
        return json.loads(reader.metadata["mergeflow.adaptation"])
