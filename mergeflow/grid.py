"""Parameter grids from few merges.

Every merge method here is affine in its ``scaling`` λ: θ(λ) = A + λ·D, where A is the merge at
λ = 0 (θ0 for task arithmetic/TIES/TSV/Iso, θ_avg for CART) and D = θ(1) − A. A grid over λ and
the other parameters therefore needs one streamed pass that merges, per distinct setting g of the
other parameters, the two points (g, λ=0) and (g, λ=1); the method's ``merge_grid`` shares work
across them (CART: one truncated SVD per task and matrix at the largest rank, reused for every
rank and every λ). The pass stores a *basis* on disk: the anchors A (one shared copy where they
coincide) and the nonzero parts of every D, both in the compute dtype (float32, or float64), taken
*before* the cast to the checkpoint's dtype. Any grid point is then A + λ·D, formed in the compute
dtype and cast once to the checkpoint's dtype, exactly as a direct merge casts its result: for
bfloat16 and float16 models a grid point equals the direct merge to float32 round-off before that
final cast (a basis of already-cast tensors would move a bf16 point by most of its change).

The basis reproduces a direct merge up to float32 round-off (|error| ≤ a few ulp of |A| + |λ·D|);
selection uses it on the validation split only, and the chosen point is merged again exactly.
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


class _PairSinks:
    """Receives (λ=0, λ=1) tensors of one grid group and one output, in the compute dtype (before the
    cast to the checkpoint's dtype); keeps anchor A and direction D = θ(1) − A."""

    def __init__(self, shared: dict[str, torch.Tensor]):
        self.shared = shared  # the first anchor seen per key, common to all groups
        self.own_anchor: dict[str, torch.Tensor] = {}
        self.direction: dict[str, torch.Tensor] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self.zero, self.one = _Half(self, 0), _Half(self, 1)

    def receive(self, half: int, key: str, tensor: torch.Tensor) -> None:
        if half == 0:
            self._pending[key] = tensor.clone()
            return
        anchor = self._pending.pop(key)
        common = self.shared.setdefault(key, anchor)
        if not torch.equal(common, anchor):
            self.own_anchor[key] = anchor
        if tensor.is_floating_point() and not torch.equal(tensor, anchor):
            self.direction[key] = tensor - anchor


class _Half:
    keeps_compute_dtype = True  # the engine hands over results before the cast to the checkpoint dtype

    def __init__(self, pair: _PairSinks, half: int):
        self.pair, self.half = pair, half

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self.pair.receive(self.half, key, tensor)

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
    has_scaling = "scaling" in spec.params.model_fields
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
        pairs = [[_PairSinks(shared) for _ in range(outputs)] for _ in groups]
        params_grid, sinks = [], []
        for group, pair in zip(groups, pairs, strict=True):
            for half, scaling in enumerate((0.0, 1.0) if has_scaling else (None,)):
                values = dict(group["params"]) if scaling is None else {**group["params"], "scaling": scaling}
                params_grid.append(parse_params(method, values))
                sinks.append([p.zero if half == 0 and has_scaling else p.one for p in pair])
        if not has_scaling:  # no λ: the single merge is the anchor, directions stay empty
            sinks = [[_AnchorOnly(p) for p in pair] for pair in pairs]
        torch_device, dtype = resolve_device(device), resolve_precision(precision)
        stream_merge(checkpoints, method, params_grid, sinks, device=torch_device, dtype=dtype)
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


class _AnchorOnly:
    keeps_compute_dtype = True

    def __init__(self, pair: _PairSinks):
        self.pair = pair

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self.pair.receive(0, key, tensor)
        self.pair.receive(1, key, tensor)

    def commit(self) -> None:
        return None

    def abort(self) -> None:
        return None


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
