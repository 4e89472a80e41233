"""AdaMerging over any evaluator: a user's own θ0, fine-tunes and unlabelled data.

:func:`adapt_checkpoints` learns AdaMerging's coefficients (:mod:`mergeflow.adamerging`) for
checkpoint files with an evaluator that implements the adaptation part of the protocol of
:class:`mergeflow.zoo.evaluation.Evaluator`: ``tasks`` (names), ``module`` (the model, for eval
mode and frozen weights), ``sample_unlabelled(task, count, generator)`` (a batch of inputs; labels
are never asked for), ``logits_with(task, inputs, params)`` (a functional forward with ``params``
replacing weights) and, optionally, ``to(device)`` and ``logits_many(batches, params)`` (every
task's batch at once, a list of logits in the order of ``batches``). The adapted model is written
atomically with its fingerprint (parameters, the sha256 of every input, the evaluator's identity
and the code identity), so a rerun with the same inputs reuses it.

An evaluator is named on the command line as ``package.module:factory``; ``factory(**options)``
returns it (``mergeflow adapt --evaluator ... --evaluator-option key=value``).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from mergeflow.adamerging import AdaMergingParams, adamerge, adaptation_vectors
from mergeflow.checkpoint import open_checkpoint, read_state_dict, stored_fingerprint
from mergeflow.codeid import code_identity
from mergeflow.devices import resolve_device
from mergeflow.errors import ConfigError
from mergeflow.hashing import sha256_file_cached
from mergeflow.writer import check_output, save_state_dict

log = logging.getLogger("mergeflow.adaptation")


class AdaptableEvaluator(Protocol):
    """What AdaMerging needs of an evaluator (see the module docstring)."""

    tasks: list[str]

    @property
    def module(self) -> torch.nn.Module: ...

    def sample_unlabelled(self, task: str, count: int, generator: torch.Generator) -> Any: ...

    def logits_with(self, task: str, inputs: Any, params: Mapping[str, torch.Tensor]) -> torch.Tensor: ...


def load_evaluator(spec: str, options: Mapping[str, Any] | None = None) -> AdaptableEvaluator:
    """``package.module:factory`` -> ``factory(**options)``; a bad name is one :class:`ConfigError` line."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"--evaluator {spec!r}: expected package.module:factory")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except ImportError as exc:
        raise ConfigError(f"--evaluator {spec!r}: cannot import {module_name} ({exc})") from None
    except AttributeError:
        raise ConfigError(f"--evaluator {spec!r}: {module_name} has no {attribute!r}") from None
    evaluator = factory(**dict(options or {}))
    missing = [n for n in ("tasks", "module", "sample_unlabelled", "logits_with") if not hasattr(evaluator, n)]
    if missing:
        raise ConfigError(f"--evaluator {spec!r}: the evaluator lacks {', '.join(missing)} (see mergeflow.adaptation)")
    return evaluator


def adaptation_fingerprint(
    params: AdaMergingParams, pretrained: str | Path, finetuned: Sequence[str | Path], evaluator_id: str
) -> str:
    """What an adapted model is computed from: parameters, input bytes, evaluator, code."""
    record = {
        "params": params.model_dump(mode="json"),
        "theta0": sha256_file_cached(pretrained),
        "models": [sha256_file_cached(m) for m in finetuned],
        "evaluator": evaluator_id,
        "code": code_identity(__name__),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def read_adaptation(path: str | Path) -> dict[str, Any]:
    """The loss history, coefficients and seconds stored in an adapted model's metadata."""
    with open_checkpoint(path) as reader:
        return json.loads(reader.metadata["mergeflow.adaptation"])


def adapt_checkpoints(
    pretrained: str | Path,
    finetuned: Sequence[str | Path],
    evaluator: AdaptableEvaluator,
    params: AdaMergingParams,
    output: str | Path,
    *,
    evaluator_id: str,
    device: str = "auto",
    name: str = "adamerging",
) -> dict[str, Any]:
    """Learn AdaMerging's coefficients on ``evaluator``'s unlabelled batches and write the adapted model.

    ``evaluator.tasks[t]`` is the task of ``finetuned[t]``. ``evaluator_id`` identifies the evaluator
    and its data (part of the fingerprint: with another identity the model is adapted again).
    Returns ``{"output", "history", "coefficients", "seconds", "reused"}``.
    """
    output = Path(output)
    inputs = [Path(pretrained), *map(Path, finetuned)]
    check_output(output, inputs)
    fingerprint = adaptation_fingerprint(params, pretrained, finetuned, evaluator_id)
    if stored_fingerprint(output) == fingerprint:
        log.info("%s: %s is up to date, not adapting again", name, output)
        meta = read_adaptation(output)
        return {"output": output, "history": meta["history"], "coefficients": meta["coefficients"],
                "seconds": meta["seconds"], "reused": True}  # fmt: skip
    tasks = list(evaluator.tasks)
    if len(tasks) != len(finetuned):
        raise ConfigError(f"the evaluator has {len(tasks)} tasks for {len(finetuned)} fine-tunes (one task each)")
    start = time.perf_counter()
    base = read_state_dict(pretrained)
    anchor, vectors = adaptation_vectors(params, base, [read_state_dict(m) for m in finetuned])
    where = resolve_device(device)
    anchor = {k: v.to(where) for k, v in anchor.items()}
    vectors = {k: v.to(where) for k, v in vectors.items()}
    if hasattr(evaluator, "to"):
        evaluator = evaluator.to(where)  # type: ignore[attr-defined]
    evaluator.module.eval()  # no dropout: the entropy is the deployed model's
    for parameter in evaluator.module.parameters():
        parameter.requires_grad_(False)

    def task_logits(state: dict[str, torch.Tensor], _: int, generator: torch.Generator) -> list[torch.Tensor]:
        batches = [(t, evaluator.sample_unlabelled(t, params.batch_size, generator)) for t in tasks]
        if hasattr(evaluator, "logits_many"):  # every task's batch in one pass (less padding)
            return evaluator.logits_many(batches, state)  # type: ignore[attr-defined]
        return [evaluator.logits_with(task, batch, state) for task, batch in batches]  # labels never read

    merged, lam, history = adamerge(anchor, vectors, task_logits, params)
    coefficients = {k: [round(float(x), 6) for x in v] for k, v in lam.items()}
    seconds = time.perf_counter() - start
    state = {k: (merged[k].to("cpu", v.dtype) if k in merged else v) for k, v in base.items()}
    record = {"history": history, "coefficients": coefficients, "seconds": seconds,
              "inputs": {"evaluator": evaluator_id, "params": params.model_dump(mode="json")}}  # fmt: skip
    meta = {"mergeflow.fingerprint": fingerprint, "mergeflow.method": name, "mergeflow.adaptation": json.dumps(record)}
    save_state_dict(output, state, meta)
    log.info("%s: adapted in %.0f s, final entropy %.4f", name, seconds, history[-1] if history else float("nan"))
    return {"output": output, "history": history, "coefficients": coefficients, "seconds": seconds, "reused": False}
