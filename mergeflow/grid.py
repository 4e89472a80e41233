"""Parameter grids from few merges.

Every method with a ``scaling`` λ is affine in it by declaration (mergeflow.methods.registry): for each
key it returns its anchor and direction (A, D), and its direct merge is θ(λ) = A + λ·D. A grid over λ
and the other parameters therefore needs one streamed pass that asks the method's ``affine_grid`` for
(A, D) at each distinct setting g of the other parameters (CART shares one truncated SVD per task and
matrix at the largest rank across every rank). The pass stores a *basis* on disk: the anchors (one
shared copy where they coincide) and the nonzero directions, in the compute dtype (float32, or
float64), before any cast to the checkpoint's dtype. Any grid point is then A + λ·D formed in the
compute dtype and cast once to each key's checkpoint dtype: the same arithmetic on the same (A, D) as
a direct merge, so a grid point equals the direct merge with the same parameters bit for bit, in every
checkpoint dtype, except where ``affine_grid`` shares work across settings (CART's shared SVD: equal to
float round-off). Methods without ``scaling`` store their merge as the anchor.

Selection uses the basis on the validation split only, and the chosen point is merged again directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mergeflow.checkpoint import DTYPE_TO_SAFETENSORS, SAFETENSORS_DTYPES, open_checkpoint
from mergeflow.codeid import code_identity
from mergeflow.devices import resolve_device, resolve_precision
from mergeflow.engine import all_finite, open_checkpoint_set, stream_merge
from mergeflow.errors import ConfigError, NumericalError
from mergeflow.methods import get_method, params_record, parse_params
from mergeflow.writer import check_output, save_state_dict, write_text_atomic

log = logging.getLogger("mergeflow.grid")


def scaling_groups(method: str, points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Group grid points by everything but ``scaling``: [{"params": p without scaling, "scalings": [...]}]."""
    has_scaling = "scaling" in get_method(method).params.model_fields
    groups: dict[str, dict[str, Any]] = {}
    for point in points:
        rest = {k: v for k, v in point.items() if k != "scaling"}
        key = json.dumps(params_record(parse_params(method, rest)), sort_keys=True)
        group = groups.setdefault(key, {"params": rest, "scalings": []})
        if has_scaling:
            scaling = float(parse_params(method, point).scaling)  # type: ignore[attr-defined]
            if scaling not in group["scalings"]:
                group["scalings"].append(scaling)
    return list(groups.values())


class _BasisSink:
    """The (A, D) pairs of one grid group and one output; an anchor equal to the shared copy (the
    first seen for the key, common to all groups) is not stored again, a zero direction not at all."""

    def __init__(self, shared: dict[str, torch.Tensor]):
        self.shared = shared
        self.own_anchor: dict[str, torch.Tensor] = {}
        self.direction: dict[str, torch.Tensor] = {}

    def write_parts(self, key: str, anchor: torch.Tensor, direction: torch.Tensor | None) -> None:
        common = self.shared.setdefault(key, anchor)
        if common is not anchor and not torch.equal(common, anchor):
            self.own_anchor[key] = anchor
        if direction is not None and bool(direction.any()):
            self.direction[key] = direction

    def commit(self) -> None:
        return None

    def abort(self) -> None:
        return None


def basis_key(method: str, groups: Sequence[Mapping[str, Any]], inputs_sha256: Sequence[str], precision: str) -> str:
    record = {"method": method, "groups": [params_record(parse_params(method, g["params"])) for g in groups],
              "inputs": list(inputs_sha256), "precision": precision,
              "code": code_identity("mergeflow.grid")}  # fmt: skip
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def build_grid_basis(
    method: str,
    pretrained: str | Path,
    finetuned: Sequence[str | Path],
    points: Sequence[Mapping[str, Any]],
    directory: str | Path,
    *,
    device: str = "auto",
    precision: str = "float32",
) -> dict[str, Any]:
    """Stream one pass over the checkpoints and write the basis of every grid point to ``directory``.

    Returns the basis description (also written as ``basis.json``): groups with their scalings,
    and per group and output the file holding its own anchors and directions.
    """
    spec = get_method(method)
    groups = scaling_groups(method, points)
    directory = Path(directory)
    outputs = len(finetuned) if spec.per_task_outputs else 1
    inputs = [Path(pretrained), *(Path(p) for p in finetuned)]
    check_output(directory, inputs, directory=True)
    for path in [directory / "anchor.safetensors", directory / "basis.json"] + [
        directory / f"group{index:03d}-out{out:02d}.safetensors"
        for index in range(len(groups))
        for out in range(outputs)
    ]:
        check_output(path, inputs)
    start = time.perf_counter()
    checkpoints = open_checkpoint_set(pretrained, finetuned)
    try:
        shared: dict[str, torch.Tensor] = {}
        pairs = [[_BasisSink(shared) for _ in range(outputs)] for _ in groups]
        params_grid = [parse_params(method, group["params"]) for group in groups]
        torch_device, dtype = resolve_device(device), resolve_precision(precision)
        stream_merge(checkpoints, method, params_grid, pairs, device=torch_device, dtype=dtype, parts=True)
        hashes = [checkpoints.pretrained_sha256, *checkpoints.finetuned_sha256]
        out_dtypes = {k: DTYPE_TO_SAFETENSORS[m.dtype] for k, m in checkpoints.layout.items() if m.is_float}
    finally:
        checkpoints.close()
    key = basis_key(method, groups, hashes, precision)
    save_state_dict(directory / "anchor.safetensors", shared, {"mergeflow.basis": key})
    described = []
    for index, (group, pair) in enumerate(zip(groups, pairs, strict=True)):
        files = []
        for out, sink in enumerate(pair):
            tensors = {f"anchor::{k}": v for k, v in sink.own_anchor.items()}
            tensors |= {f"direction::{k}": v for k, v in sink.direction.items()}
            path = directory / f"group{index:03d}-out{out:02d}.safetensors"
            save_state_dict(path, tensors, {"mergeflow.basis": key})
            files.append(str(path))
        described.append({"params": group["params"], "scalings": group["scalings"], "files": files})
    basis = {"method": method, "key": key, "anchor": str(directory / "anchor.safetensors"), "groups": described,
             "per_task_outputs": spec.per_task_outputs, "precision": precision, "dtypes": out_dtypes}  # fmt: skip
    write_text_atomic(directory / "basis.json", json.dumps(basis, indent=1))
    log.info("%s grid basis: %d groups, %d points, one pass in %.1f s", method, len(groups),
             sum(max(1, len(g["scalings"])) for g in groups), time.perf_counter() - start)  # fmt: skip
    return basis


def _read(path: str | Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as reader:
        return {key: reader.load(key) for key in reader.keys()}


def point_states(basis: Mapping[str, Any], group: int, scaling: float | None) -> list[dict[str, torch.Tensor]]:
    """The merged state dict(s) of one grid point (one per task for per-task methods): A + λ·D in
    the compute dtype, then cast to each key's checkpoint dtype, as a direct merge casts its result."""
    if not 0 <= group < len(basis["groups"]):
        raise ConfigError(f"grid group {group} out of range (basis has {len(basis['groups'])})")
    if scaling is not None and not math.isfinite(scaling):
        raise ConfigError(f"grid point scaling {scaling!r} is not a finite number")
    out_dtypes = {k: SAFETENSORS_DTYPES[v] for k, v in basis.get("dtypes", {}).items()}
    anchor = _read(basis["anchor"])
    states = []
    for path in basis["groups"][group]["files"]:
        own = _read(path)
        state = dict(anchor)
        for name, tensor in own.items():
            kind, key = name.split("::", 1)
            if kind == "anchor":
                state[key] = tensor
        for name, tensor in own.items():
            kind, key = name.split("::", 1)
            if kind == "direction" and scaling:
                state[key] = state[key] + scaling * tensor
        for key, dtype in out_dtypes.items():
            state[key] = state[key].to(dtype)
            if not all_finite(state[key]):
                raise NumericalError(f"{basis['method']}: grid point λ={scaling}: key {key!r} is not finite in {dtype}")
        states.append(state)
    return states


def remove_basis(directory: str | Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
