"""The streaming merge driver.

For each key (in sorted order) it reads θ0 and every θt, checks them, hands the float tensors to
the method's :class:`~mergeflow.methods.registry.Merger` on the compute device, casts the result to
the pretrained dtype and streams it into the outputs. Memory holds one key of every input at a
time (plus whatever a method's global pass needs, at most one model), never T whole models.

Tasks are put in a canonical order (by sha256 of their files) before merging, so the output is
bit-for-bit independent of the order in which the fine-tunes were listed.

Nothing unsafe is committed: every merged tensor is checked finite after the cast to its output
dtype (an overflow in float16/bfloat16 is refused with the key named), every input's file state
(size, mtime, ctime, inode) is checked unchanged before the outputs are renamed into place, so the
sha256 recorded is that of the bytes that were merged, and an output that is an input or not a
regular file is refused before anything is opened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

import mergeflow
from mergeflow.checkpoint import (
    CheckpointReader,
    ModelDirectoryReader,
    TensorMeta,
    companion_files,
    open_checkpoint,
    stored_fingerprint,
)
from mergeflow.codeid import code_identity
from mergeflow.devices import resolve_device, resolve_out_dtype, resolve_precision
from mergeflow.errors import CheckpointError, ConfigError, IncompatibleCheckpointsError, NumericalError
from mergeflow.hashing import (
    BackgroundHasher,
    FileSet,
    fileset_quick_identity,
    fileset_sha256_cached,
    fileset_state,
)
from mergeflow.hfdir import (
    DEFAULT_SHARD_SIZE,
    HFDirectoryWriter,
    check_directory_output,
    model_card,
    parse_size,
    stored_directory_fingerprint,
)
from mergeflow.methods import MergeContext, Merger, MethodParams, get_method, params_record, parse_params
from mergeflow.methods.registry import TensorSource
from mergeflow.selectors import detect_layout
from mergeflow.writer import SafetensorsWriter, check_output

log = logging.getLogger("mergeflow.engine")


class Sink(Protocol):
    """Where merged tensors go: a file writer, or anything with the same three calls. Float results
    arrive cast to the checkpoint's dtype."""

    def write(self, key: str, tensor: torch.Tensor) -> None: ...

    def commit(self) -> Any: ...

    def abort(self) -> None: ...


class PartsSink(Protocol):
    """Where the (A, D) pairs of an affine stream go (grid bases): θ(λ) = A + λ·D per key, in the
    compute dtype, before any cast; ``direction`` is None for keys that do not move with λ."""

    def write_parts(self, key: str, anchor: torch.Tensor, direction: torch.Tensor | None) -> None: ...

    def commit(self) -> Any: ...

    def abort(self) -> None: ...


@dataclass
class CheckpointSet:
    """θ0 and T fine-tunes, opened and checked for compatibility; sha256 hashes are computed in
    the background while the merge runs and waited for only where they are needed."""

    pretrained: CheckpointReader
    finetuned: list[CheckpointReader]
    layout: dict[str, TensorMeta]
    task_order: tuple[int, ...]
    hasher: BackgroundHasher
    states: tuple[list[list[int]], ...] = ()

    @property
    def canonical(self) -> list[CheckpointReader]:
        return [self.finetuned[i] for i in self.task_order]

    @property
    def pretrained_sha256(self) -> str:
        return self.hasher.result()[0]

    @property
    def finetuned_sha256(self) -> list[str]:
        return self.hasher.result()[1:]

    def verify_unchanged(self) -> None:
        """Refuse to go on if any input file (every shard and companion file of a directory) changed
        since it was opened (its bytes may differ from those read or hashed)."""
        for reader, before in zip((self.pretrained, *self.finetuned), self.states, strict=False):
            try:
                now = fileset_state(input_files(reader))
            except OSError as exc:
                where = exc.filename or reader.path
                raise CheckpointError(f"{where}: vanished while being merged ({exc.strerror})") from None
            if now != before:
                changed = [name for (name, _), a, b in zip(input_files(reader).named(), before, now, strict=False)
                           if a != b]  # fmt: skip
                what = f" ({', '.join(changed[:3])})" if changed and changed != ["."] else ""
                raise CheckpointError(
                    f"{reader.path}: changed while being merged{what}; nothing was written, run again"
                )

    def close(self) -> None:
        self.hasher.close()
        for reader in (self.pretrained, *self.finetuned):
            reader.close()

    def inputs_record(self, placeholder: bool = False) -> dict[str, Any]:
        """File names and sha256 of every input (``placeholder``: zeros of the same length)."""
        hashes = ["0" * 64] * (1 + len(self.finetuned)) if placeholder else self.hasher.result()
        return {
            "pretrained": {"file": self.pretrained.path.name, "sha256": hashes[0]},
            "finetuned": [{"file": r.path.name, "sha256": h} for r, h in zip(self.finetuned, hashes[1:], strict=True)],
        }


def input_files(reader: CheckpointReader) -> FileSet:
    """The files an opened input is read from, as one :class:`~mergeflow.hashing.FileSet`."""
    return FileSet(reader.root, reader.files)


def _describe_keys(keys: set[str]) -> str:
    shown = ", ".join(sorted(keys)[:3])
    return f"{len(keys)} key(s) ({shown}{', ...' if len(keys) > 3 else ''})"


def check_compatible(
    pretrained: CheckpointReader, finetuned: Sequence[CheckpointReader], cast: bool = False
) -> dict[str, TensorMeta]:
    """Same key set, shapes and dtypes as θ0 in every fine-tune; returns θ0's layout.

    ``cast`` accepts a float key stored in another float dtype than θ0's (each input is converted to
    the compute dtype as it is read); a non-float key must always have θ0's dtype.
    """
    layout = {key: pretrained.meta(key) for key in pretrained.keys()}
    if not layout:
        raise CheckpointError(f"{pretrained.path}: holds no tensors")
    expected = set(layout)
    for reader in finetuned:
        keys = set(reader.keys())
        missing, extra = expected - keys, keys - expected
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {_describe_keys(missing)} that {pretrained.path.name} has")
            if extra:
                parts.append(f"has {_describe_keys(extra)} that {pretrained.path.name} lacks")
            raise IncompatibleCheckpointsError(f"{reader.path}: key sets differ: {'; '.join(parts)}")
        for key, want in layout.items():
            got = reader.meta(key)
            if got.shape != want.shape:
                raise IncompatibleCheckpointsError(
                    f"{reader.path}: key {key!r} has shape {list(got.shape)}, pretrained has {list(want.shape)}"
                )
            if got.dtype != want.dtype and not (cast and got.is_float and want.is_float):
                hint = " (--cast converts float inputs explicitly)" if got.is_float and want.is_float else ""
                raise IncompatibleCheckpointsError(
                    f"{reader.path}: key {key!r} has dtype {got.dtype}, pretrained has {want.dtype}{hint}"
                )
    return layout


def open_checkpoint_set(
    pretrained: str | Path,
    finetuned: Sequence[str | Path],
    trust_pickle: bool = False,
    fresh_hashes: bool = False,
    cast: bool = False,
) -> CheckpointSet:
    """Open and validate θ0 and the fine-tunes, and start hashing them in the background.

    Tasks get a canonical order that depends only on file contents: a quick identity (size,
    header, sampled blocks), with full sha256 hashes only to break ties between files it cannot
    tell apart, so that the merge result does not depend on the order the user gave.
    ``fresh_hashes`` reads every file for its sha256 instead of trusting the stat-keyed cache;
    ``cast`` accepts fine-tunes whose float keys have another float dtype than θ0's.
    """
    if not finetuned:
        raise ConfigError("at least one fine-tuned checkpoint is needed")
    with ExitStack() as stack:
        base = stack.enter_context(open_checkpoint(pretrained, trust_pickle))
        tuned = [stack.enter_context(open_checkpoint(p, trust_pickle)) for p in finetuned]
        files = [input_files(r) for r in (base, *tuned)]
        states = tuple(fileset_state(f) for f in files)
        layout = check_compatible(base, tuned, cast)
        quick = [fileset_quick_identity(f) for f in files[1:]]
        tied = {i for i in range(len(tuned)) if quick.count(quick[i]) > 1}
        full = {i: fileset_sha256_cached(files[1 + i], fresh=fresh_hashes) for i in tied}
        order = tuple(sorted(range(len(tuned)), key=lambda i: (quick[i], full.get(i, ""), i)))
        hasher = BackgroundHasher(files, fresh=fresh_hashes)
        stack.pop_all()
    return CheckpointSet(base, tuned, layout, order, hasher, states)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a float tensor holds no NaN/Inf.

    A finite sum proves it (NaN propagates; ±inf stays inf or becomes NaN), and one reduction is
    several times cheaper than an elementwise ``isfinite``; only a non-finite sum (NaN/Inf, or a
    finite overflow) needs the exact check.
    """
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def load_checked(reader: CheckpointReader, key: str) -> torch.Tensor:
    """Load one tensor, refusing NaN/Inf in floating-point data."""
    tensor = reader.load(key)
    if tensor.dtype.is_floating_point and not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(f"{reader.path}: key {key!r} holds {bad} NaN/Inf value(s)")
    return tensor


class _Source(TensorSource):
    def __init__(self, checkpoints: CheckpointSet, device: torch.device, dtype: torch.dtype):
        self.checkpoints, self.device, self.dtype = checkpoints, device, dtype

    def _to(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=self.dtype)

    def iter_all(self, keys: Sequence[str]) -> Iterator[tuple[str, torch.Tensor, list[torch.Tensor]]]:
        for key in keys:
            base = self._to(load_checked(self.checkpoints.pretrained, key))
            yield key, base, [self._to(load_checked(r, key)) for r in self.checkpoints.canonical]

    def iter_task(self, keys: Sequence[str], task: int) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        reader = self.checkpoints.canonical[task]
        for key in keys:
            yield key, self._to(load_checked(self.checkpoints.pretrained, key)), self._to(load_checked(reader, key))


class _Progress:
    """Logs progress at most every few seconds and at the end."""

    def __init__(self, label: str, total: int, every_s: float = 5.0):
        self.label, self.total, self.every_s = label, total, every_s
        self.start = self.last = time.perf_counter()

    def step(self, done: int) -> None:
        now = time.perf_counter()
        if done == self.total or now - self.last >= self.every_s:
            self.last = now
            log.info(
                "%s: %d/%d keys (%.0f%%), %.1f s",
                self.label,
                done,
                self.total,
                100 * done / self.total,
                now - self.start,
            )


def dtype_record(precision: str, out_dtype: str | None = None, cast: bool = False) -> dict[str, Any]:
    """The dtype policy of a merge: compute dtype, output dtype of float keys ("pretrained": each
    key's θ0 dtype) and whether fine-tunes in other float dtypes were converted (``--cast``)."""
    return {"compute": precision, "output": out_dtype or "pretrained", "cast": cast}


def fingerprint(
    method: str,
    params: MethodParams,
    checkpoints: CheckpointSet,
    precision: str,
    dtypes: Mapping[str, Any] | None = None,
) -> str:
    """Content identity of one merge result: method, parameters, input hashes, precision and dtype
    policy, and the identity of the code that merges (this module and everything it imports, version
    included)."""
    record = {
        "method": method,
        "params": params_record(params),
        "inputs": [checkpoints.pretrained_sha256, *checkpoints.finetuned_sha256],
        "precision": precision,
        "dtype": dict(dtypes or dtype_record(precision)),
        "code": code_identity("mergeflow.engine"),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def output_metadata(
    method: str,
    params: MethodParams,
    merger: Merger,
    checkpoints: CheckpointSet,
    precision: str,
    device: torch.device,
    placeholder: bool = False,
    dtypes: Mapping[str, Any] | None = None,
    recipe: str | None = None,
) -> dict[str, str]:
    """Provenance stored in every output; ``placeholder`` stands in zeros for hashes not known yet.
    Per-task methods add ``mergeflow.storage``: bytes beyond θ0, shared and per task; a merge run
    from a recipe file stores its text as ``mergeflow.recipe``."""
    selector = params.selector()
    dtypes = dict(dtypes or dtype_record(precision))
    cost = merger.storage_cost()
    return {
        "format": "pt",
        "mergeflow.version": mergeflow.__version__,
        "mergeflow.code": code_identity("mergeflow.engine"),
        "mergeflow.method": method,
        "mergeflow.params": json.dumps(params_record(params), sort_keys=True),
        "mergeflow.inputs": json.dumps(checkpoints.inputs_record(placeholder)),
        "mergeflow.selection": json.dumps(
            {
                "selector": selector.describe() if selector else None,
                "layout": detect_layout(list(checkpoints.layout), checkpoints.pretrained.model_type),
                "keys": sorted(merger.selected),
            }
        ),
        "mergeflow.precision": precision,
        "mergeflow.dtype": json.dumps(dtypes, sort_keys=True),
        "mergeflow.device": device.type,
        **({"mergeflow.storage": json.dumps(cost.record(len(checkpoints.finetuned)))} if cost else {}),
        **({"mergeflow.recipe": recipe} if recipe is not None else {}),
        "mergeflow.fingerprint": "0" * 64
        if placeholder
        else fingerprint(method, params, checkpoints, precision, dtypes),
    }


def output_layout(layout: Mapping[str, TensorMeta], out_dtype: torch.dtype | None) -> dict[str, TensorMeta]:
    """The layout written: every float key in ``out_dtype`` (θ0's dtype where None), others as θ0's."""
    if out_dtype is None:
        return dict(layout)
    return {k: TensorMeta(m.shape, out_dtype) if m.is_float else m for k, m in layout.items()}


def stream_merge(
    checkpoints: CheckpointSet,
    method: str,
    params_grid: Sequence[MethodParams],
    sinks: Sequence[Sequence[Sink]] | Sequence[Sequence[PartsSink]],
    *,
    device: torch.device,
    dtype: torch.dtype,
    parts: bool = False,
    out_dtype: torch.dtype | None = None,
) -> None:
    """Merge every key for each parameter set of ``method`` and stream results into ``sinks``.

    ``sinks[g]`` holds one sink for grid point ``g`` (or T sinks, in the user's task order, for
    per-task methods). With ``parts`` the sinks are :class:`PartsSink` and receive each key's (A, D)
    from the method's ``affine_grid`` in the compute dtype (grid bases; θ(λ) = A + λ·D is formed by
    the reader, as ``merge`` forms it); otherwise they receive merged tensors cast to each key's
    checkpoint dtype (float keys to ``out_dtype`` when given). Every tensor handed over is checked
    finite. Sinks are committed at the end, or aborted on any error.
    """
    spec = get_method(method)
    ctx = MergeContext(len(checkpoints.finetuned), checkpoints.layout, device, dtype, checkpoints.task_order)
    mergers = [spec.merger(p, ctx) for p in params_grid]
    source = _Source(checkpoints, device, dtype)
    all_sinks = [s for group in sinks for s in group]

    def finite(key: str, out: torch.Tensor, before: torch.Tensor, what: str = "") -> None:
        if not all_finite(out):
            bad = int((~torch.isfinite(out)).sum())
            peak = float(before.abs().max()) if before.numel() else 0.0
            raise NumericalError(
                f"{method}: merged key {key!r}{what} has {bad} non-finite value(s) in {out.dtype} (largest |value| "
                f"before the cast {peak:.3g}); lower the scaling or merge into a wider dtype"
            )

    def put(sink: Any, key: str, result: Any, meta: TensorMeta) -> None:
        if parts:
            anchor, direction = result
            finite(key, anchor, anchor, " (anchor)")
            if direction is not None:
                finite(key, direction, direction, " (direction)")
            sink.write_parts(key, anchor, direction)
            return
        out = result.to(out_dtype or meta.dtype)
        finite(key, out, result)
        sink.write(key, out)

    def results_of(key: str, base: torch.Tensor, tuned: list[torch.Tensor]) -> Iterable[Any]:
        if parts:
            return mergers[0].affine_grid(key, base, tuned, mergers)
        if len(mergers) == 1:
            return [mergers[0].merge(key, base, tuned)]
        return mergers[0].merge_grid(key, base, tuned, mergers)  # lazily: one point's tensor at a time

    try:
        for merger in mergers:
            merger.prepare(source)
        keys = sorted(checkpoints.layout)
        progress = _Progress(f"{method} x{len(mergers)}" if len(mergers) > 1 else method, len(keys))
        for done, key in enumerate(keys, 1):
            meta = checkpoints.layout[key]
            base_raw = load_checked(checkpoints.pretrained, key)
            tuned_raw = [load_checked(r, key) for r in checkpoints.canonical]
            if not meta.is_float:
                for reader, tensor in zip(checkpoints.canonical, tuned_raw, strict=True):
                    if not torch.equal(tensor, base_raw):
                        raise IncompatibleCheckpointsError(
                            f"{reader.path}: non-float key {key!r} differs from the pretrained checkpoint's"
                        )
                for sink in all_sinks:
                    if parts:
                        sink.write_parts(key, base_raw, None)  # type: ignore[union-attr]
                    else:
                        sink.write(key, base_raw)  # type: ignore[union-attr]
            else:
                base = base_raw.to(device=device, dtype=dtype)
                tuned = [t.to(device=device, dtype=dtype) for t in tuned_raw]
                del tuned_raw
                try:
                    for group, result in zip(sinks, results_of(key, base, tuned), strict=True):
                        if isinstance(result, list):  # per-task outputs, canonical order -> user order
                            for position, item in enumerate(result):
                                put(group[checkpoints.task_order[position]], key, item, meta)
                        else:
                            put(group[0], key, result, meta)
                except NumericalError as exc:
                    if str(exc).startswith(f"{method}: merged key"):
                        raise
                    raise NumericalError(f"{method}: key {key!r}: {exc}") from None
                except torch.linalg.LinAlgError as exc:
                    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    raise NumericalError(f"{method}: key {key!r}: linear algebra failed ({first})") from None
            progress.step(done)
        checkpoints.verify_unchanged()
        for sink in all_sinks:
            sink.commit()
    except BaseException:
        for sink in all_sinks:
            sink.abort()
        raise


@dataclass
class MergeResult:
    method: str
    params: dict[str, Any]
    outputs: list[Path]
    seconds: float
    skipped: bool
    inputs: dict[str, Any]


def task_output_paths(directory: Path, finetuned: Sequence[str | Path]) -> list[Path]:
    """File names of per-task outputs (``cart_indexing``): ``NN-<stem>.safetensors`` in user order."""
    return [directory / f"{i:02d}-{Path(p).name.split('.')[0]}.safetensors" for i, p in enumerate(finetuned)]


def _directory_writer(
    output: Path,
    checkpoints: CheckpointSet,
    layout: Mapping[str, TensorMeta],
    metadata: Callable[..., dict[str, str]],
    shard_size: int,
    given: Sequence[Path],
    command: str | None,
) -> HFDirectoryWriter:
    """The sink of a Hugging Face directory output: θ0's companion files copied (those its identity covers)."""
    base = checkpoints.pretrained
    copy: list[Path] = []
    if isinstance(base, ModelDirectoryReader) and base.path == base.root:
        covered = set(base.files)
        copy = [f for f in companion_files(base.root) if f in covered]
    names = [str(p) for p in given]
    every_file = [*given, *(f for r in (base, *checkpoints.finetuned) for f in r.files)]
    return HFDirectoryWriter(
        output,
        layout,
        metadata(0, placeholder=True),
        final_metadata=lambda: metadata(0, placeholder=False),
        shard_size=shard_size,
        copy_files=copy,
        card=lambda final: model_card(final, names, command),
        inputs=every_file,
    )


def merge_checkpoints(
    method: str,
    pretrained: str | Path,
    finetuned: Sequence[str | Path],
    output: str | Path,
    params: Mapping[str, Any] | MethodParams | None = None,
    *,
    device: str = "auto",
    precision: str = "float32",
    trust_pickle: bool = False,
    force: bool = False,
    output_format: str = "safetensors",
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    command: str | None = None,
    out_dtype: str | None = None,
    cast: bool = False,
    recipe: str | None = None,
) -> MergeResult:
    """Merge θ0 and fine-tunes with ``method`` and write safetensors atomically.

    ``output`` is a file, or a directory for per-task methods (one file per fine-tune); with
    ``output_format="hf"`` it is a Hugging Face model directory (see :mod:`mergeflow.hfdir`:
    shards of ``shard_size``, index, θ0's config/tokenizer files, a model card naming ``command``). When the
    outputs already exist with the same fingerprint (same method, parameters, input contents,
    precision and code identity), nothing is recomputed unless ``force``; ``force`` also reads
    every input afresh for its sha256 instead of trusting the hash cache.
    Outputs that are inputs, or exist and are not regular files, are refused before any file is opened.

    Dtype policy (recorded as ``mergeflow.dtype``): the merge is computed in ``precision``; float keys
    are stored in ``out_dtype`` (each key's θ0 dtype when None); a fine-tune whose float key has
    another dtype than θ0's is refused unless ``cast``. ``recipe``: the text of the recipe file the
    merge came from, stored in the metadata and the model card.
    """
    spec = get_method(method)
    parsed = parse_params(method, params)
    torch_device, dtype = resolve_device(device), resolve_precision(precision)
    stored_dtype = resolve_out_dtype(out_dtype)
    dtypes = dtype_record(precision, out_dtype, cast)
    output = Path(output)
    paths = task_output_paths(output, finetuned) if spec.per_task_outputs else [output]
    inputs = [Path(pretrained), *(Path(p) for p in finetuned)]
    hf_directory = output_format == "hf"
    if output_format not in ("safetensors", "hf"):
        raise ConfigError(f"unknown output format {output_format!r}; known: safetensors, hf")
    if hf_directory:
        if spec.per_task_outputs:
            raise ConfigError(f"{method} writes one checkpoint per fine-tune; --format hf is for one merged model")
        shard_bytes = parse_size(shard_size)
        check_directory_output(output, inputs)
    if spec.per_task_outputs:
        check_output(output, inputs, directory=True)
    for path in paths if not hf_directory else ():
        check_output(path, inputs)
    start = time.perf_counter()
    checkpoints = open_checkpoint_set(pretrained, finetuned, trust_pickle, fresh_hashes=force, cast=cast)
    try:
        read_files = [f for r in (checkpoints.pretrained, *checkpoints.finetuned) for f in r.files]
        for path in paths if not hf_directory else ():  # e.g. DIR/model.safetensors of a directory input
            check_output(path, read_files)
        ctx = MergeContext(len(finetuned), checkpoints.layout, torch_device, dtype, checkpoints.task_order)
        probe = spec.merger(parsed, ctx)
        if hf_directory:
            existing = [stored_directory_fingerprint(output, shard_bytes)]
        else:
            existing = [stored_fingerprint(p) for p in paths]
        if not force and all(existing):  # only then are the hashes needed before merging
            if set(existing) == {fingerprint(method, parsed, checkpoints, precision, dtypes)}:
                log.info("%s: %s is up to date (same inputs and parameters), skipping", method, output)
                return MergeResult(method, params_record(parsed), paths, 0.0, True, checkpoints.inputs_record())

        def metadata(index: int, placeholder: bool) -> dict[str, str]:
            meta = output_metadata(
                method, parsed, probe, checkpoints, precision, torch_device, placeholder, dtypes, recipe
            )
            if spec.per_task_outputs:
                meta["mergeflow.task"] = json.dumps({"index": index, "file": checkpoints.finetuned[index].path.name})
            return meta

        layout = output_layout(checkpoints.layout, stored_dtype)
        writers: list[Sink] = []
        try:
            if hf_directory:
                writers.append(_directory_writer(output, checkpoints, layout, metadata, shard_bytes, inputs, command))
            for index, path in enumerate(paths if not hf_directory else ()):
                writers.append(
                    SafetensorsWriter(
                        path,
                        layout,
                        metadata(index, placeholder=True),
                        final_metadata=lambda index=index: metadata(index, placeholder=False),
                    )
                )
        except BaseException:
            for writer in writers:
                writer.abort()
            raise
        log.info(
            "%s %s: %d fine-tunes, %d keys, %d matrices factorized, %s/%s",
            method, params_record(parsed), len(finetuned), len(checkpoints.layout), len(probe.selected),
            torch_device.type, precision,
        )  # fmt: skip
        stream_merge(checkpoints, method, [parsed], [writers], device=torch_device, dtype=dtype, out_dtype=stored_dtype)
        record = checkpoints.inputs_record()
    finally:
        checkpoints.close()
    seconds = time.perf_counter() - start
    log.info("%s: wrote %s in %.1f s", method, output, seconds)
    return MergeResult(method, params_record(parsed), paths, seconds, False, record)
