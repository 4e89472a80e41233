"""Hugging Face model directories as merge outputs, written all-or-nothing.

A directory output holds safetensors shards of at most ``shard_size`` bytes each
(``model-00001-of-0000N.safetensors``, keys in sorted order, a tensor larger than the limit alone in
its shard), ``model.safetensors.index.json`` (``metadata.total_size`` and a ``weight_map`` of every
key), the files of θ0's directory that describe the model and its inputs (``config.json``, tokenizer
and processor files: :data:`~mergeflow.checkpoint.COMPANION_PATTERNS`) copied unchanged, and a model
card ``README.md``: YAML front matter with ``base_model`` (θ0 and every fine-tune as given),
``base_model_relation: merge`` and ``tags: [merge, mergeflow]``; the body names the method, its
parameters, every input's sha256 and the command. Every shard carries the same provenance metadata
as a single-file output; the index's ``metadata`` repeats it (``mergeflow.*`` keys), which is what
marks a directory as a mergeflow output.

All of it is written into a hidden sibling ``.NAME.partial-PID`` directory and renamed onto
``NAME`` only once every shard is committed, so a killed merge never leaves a directory that looks
complete. An existing ``NAME`` is replaced only if it is a previous mergeflow output: it is first
renamed aside (``.NAME.old-PID``), the new directory renamed into place, and the old one deleted.
A target that is one of the inputs, contains one of them (or a file one of them is read from),
is a symbolic link or is anything but a mergeflow output is refused before anything is written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
import yaml

from mergeflow.checkpoint import MAX_INDEX_BYTES, TensorMeta, stored_fingerprint
from mergeflow.errors import ConfigError, OutputError
from mergeflow.writer import SafetensorsWriter, check_parent, fsync_dir, os_failure, stale_leftovers

log = logging.getLogger("mergeflow.hfdir")

INDEX_NAME = "model.safetensors.index.json"
CARD_NAME = "README.md"
DEFAULT_SHARD_SIZE = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(size: int | str) -> int:
    """Bytes from ``500MB``, ``5GB``, ``20KB`` (powers of 1000, as transformers), ``1GiB`` or an integer."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
        if match is None or match.group(2) not in _UNITS:
            raise ConfigError(f"shard size {size!r}: expected a number of bytes or e.g. 500MB, 5GB, 1GiB")
        value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value <= 0:
        raise ConfigError(f"shard size {size!r}: must be positive")
    return value


def _nbytes(meta: TensorMeta) -> int:
    return meta.numel * torch.empty((), dtype=meta.dtype).element_size()


def plan_shards(layout: Mapping[str, TensorMeta], shard_size: int) -> list[list[str]]:
    """Keys in sorted order, cut greedily into shards of at most ``shard_size`` bytes of tensor data."""
    shards: list[list[str]] = [[]]
    used = 0
    for key in sorted(layout):
        size = _nbytes(layout[key])
        if shards[-1] and used + size > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def shard_file_names(count: int) -> list[str]:
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def read_index_metadata(directory: Path) -> dict[str, object] | None:
    """The ``metadata`` of a directory's index, or None when there is no readable index (only a regular
    file of at most 100 MB is read: a FIFO in its place is never opened)."""
    index_path = directory / INDEX_NAME
    try:
        info = os.stat(index_path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_INDEX_BYTES:
            return None
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    metadata = index.get("metadata") if isinstance(index, dict) else None
    return metadata if isinstance(metadata, dict) else None


def is_mergeflow_output(directory: Path) -> bool:
    """Whether ``directory`` was written by mergeflow (its index carries a mergeflow fingerprint)."""
    metadata = read_index_metadata(directory)
    return metadata is not None and isinstance(metadata.get("mergeflow.fingerprint"), str)


def stored_directory_fingerprint(directory: Path, shard_size: int) -> str | None:
    """The fingerprint of a complete previous output written with the same shard size (else None)."""
    metadata = read_index_metadata(directory)
    if metadata is None or metadata.get("mergeflow.shard_size") != str(shard_size):
        return None
    stored = stored_fingerprint(directory)
    return stored if stored is not None and metadata.get("mergeflow.fingerprint") == stored else None


def _real(path: Path) -> str:
    return os.path.realpath(path)


def check_directory_output(target: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse a directory target that is or contains an input, or exists and is not a mergeflow output.

    Only ``lstat``/``stat`` calls and a read of an existing target's index are made.
    """
    target = Path(target)
    try:
        st = os.lstat(target)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as exc:
        raise OutputError(f"{target}: cannot inspect the output ({exc.strerror})") from None
    real_target = _real(target)
    for source in inputs:
        real_source = _real(Path(source))
        if real_source == real_target:
            raise OutputError(f"{target}: the output is the input {source}; refusing to overwrite an input")
        if real_source.startswith(real_target.rstrip(os.sep) + os.sep):
            raise OutputError(f"{target}: the output directory contains the input {source}; refusing to replace it")
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise OutputError(f"{target}: the output is a symbolic link; give the real path (links are never replaced)")
        if not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{target}: the output exists and is not a directory; refusing to replace it")
        if not is_mergeflow_output(target):
            raise OutputError(
                f"{target}: the output directory exists and is not a mergeflow output (no {INDEX_NAME} with "
                "mergeflow metadata); refusing to replace it"
            )
    check_parent(target)
    return target


def remove_stale_partial_dirs(target: Path) -> list[Path]:
    """Delete ``.NAME.partial-PID`` / ``.NAME.old-PID`` directories beside ``target`` whose process is gone."""
    removed: list[Path] = []
    for leftover in stale_leftovers(target, "partial|old"):
        try:
            is_dir = stat.S_ISDIR(os.lstat(leftover).st_mode)
        except OSError:
            continue
        if is_dir:
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    if removed:
        log.info("removed %d directory(ies) left by killed writers of %s", len(removed), target)
    return removed


def model_card(metadata: Mapping[str, str], base_models: Sequence[str], command: str | None) -> str:
    """``README.md`` of a merged model: YAML front matter for the Hub, then method, parameters, inputs, command."""
    front = {
        "base_model": list(base_models),
        "base_model_relation": "merge",
        "tags": ["merge", "mergeflow"],
    }
    method = metadata.get("mergeflow.method", "?")
    params = json.loads(metadata.get("mergeflow.params", "{}"))
    inputs = json.loads(metadata.get("mergeflow.inputs", "{}"))
    hashes = [inputs.get("pretrained", {}), *inputs.get("finetuned", [])]
    rows = []
    for position, (name, record) in enumerate(zip(base_models, hashes, strict=False)):
        role = "pretrained (θ0)" if position == 0 else f"fine-tune {position}"
        rows.append(f"| {role} | `{name}` | `{record.get('sha256', '')}` |")
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        "# Merged model",
        "",
        f"Merged with mergeflow {metadata.get('mergeflow.version', '')} "
        f"using the `{method}` method, in {metadata.get('mergeflow.precision', '?')} "
        f"on {metadata.get('mergeflow.device', '?')}.",
        "",
        "## Parameters",
        "",
        "```json",
        json.dumps(params, indent=2, sort_keys=True),
        "```",
        "",
        "## Inputs",
        "",
        "| role | checkpoint | sha256 |",
        "|---|---|---|",
        *rows,
        "",
        f"Fingerprint of this merge: `{metadata.get('mergeflow.fingerprint', '')}`.",
        "",
    ]
    if command:
        lines += ["## Command", "", "```sh", command, "```", ""]
    if "mergeflow.recipe" in metadata:
        lines += ["## Recipe", "", "```yaml", metadata["mergeflow.recipe"].rstrip("\n"), "```", ""]
    return "\n".join(lines)


class HFDirectoryWriter:
    """A sink writing a Hugging Face model directory: shards, index, copied files, model card.

    Same calls as :class:`~mergeflow.writer.SafetensorsWriter` (``write`` in any order, ``commit``,
    ``abort``); ``final_metadata`` gives the provenance at commit (input hashes known by then), and
    ``card`` turns it into the model card's text.
    """

    def __init__(
        self,
        path: str | Path,
        layout: Mapping[str, TensorMeta],
        metadata: Mapping[str, str],
        final_metadata: Callable[[], Mapping[str, str]],
        *,
        shard_size: int | str = DEFAULT_SHARD_SIZE,
        copy_files: Sequence[Path] = (),
        card: Callable[[Mapping[str, str]], str] | None = None,
        inputs: Iterable[str | Path] = (),
    ):
        self.path = Path(path)
        self.shard_size = parse_size(shard_size)
        self._inputs = [Path(p) for p in inputs]
        self._final_metadata = final_metadata
        self._card = card
        self._committed = False
        self._writers: list[SafetensorsWriter] = []
        check_directory_output(self.path, self._inputs)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_failure(self.path, exc) from None
        remove_stale_partial_dirs(self.path)
        self._tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        shutil.rmtree(self._tmp, ignore_errors=True)
        try:
            self._tmp.mkdir()
            for source in copy_files:
                if source.name in (INDEX_NAME, CARD_NAME):
                    continue
                shutil.copyfile(source, self._tmp / source.name)
        except OSError as exc:
            self.abort()
            raise os_failure(self.path, exc) from None
        plan = plan_shards(layout, self.shard_size)
        self._names = shard_file_names(len(plan))
        self._owner: dict[str, int] = {}
        self._total = sum(_nbytes(meta) for meta in layout.values())
        try:
            for number, keys in enumerate(plan):
                self._writers.append(
                    SafetensorsWriter(
                        self._tmp / self._names[number],
                        {key: layout[key] for key in keys},
                        metadata,
                        final_metadata=final_metadata,
                    )
                )
                self._owner.update(dict.fromkeys(keys, number))
        except BaseException:
            self.abort()
            raise

    @property
    def shard_names(self) -> list[str]:
        return list(self._names)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if key not in self._owner:
            raise KeyError(f"{key!r} is not part of this directory's layout")
        self._writers[self._owner[key]].write(key, tensor)

    def commit(self) -> Path:
        """Commit every shard, write the index and the card, then rename the directory into place."""
        try:
            for writer in self._writers:
                writer.commit()
            final = dict(self._final_metadata())
            index_metadata: dict[str, object] = {"total_size": self._total}
            index_metadata.update({k: v for k, v in final.items() if k.startswith("mergeflow.")})
            index_metadata["mergeflow.shard_size"] = str(self.shard_size)
            index = {
                "metadata": index_metadata,
                "weight_map": {key: self._names[n] for key, n in sorted(self._owner.items())},
            }
            self._write_text(INDEX_NAME, json.dumps(index, indent=2) + "\n")
            if self._card is not None:
                self._write_text(CARD_NAME, self._card(final))
            fsync_dir(self._tmp)
            check_directory_output(self.path, self._inputs)  # nothing took the target's place meanwhile
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            replaced = os.path.lexists(self.path)
            if replaced:
                shutil.rmtree(old, ignore_errors=True)
                os.rename(self.path, old)
            try:
                os.rename(self._tmp, self.path)
            except OSError:
                if replaced:
                    os.rename(old, self.path)  # put the previous output back
                raise
            fsync_dir(self.path.parent)
            self._committed = True
            if replaced:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            self.abort()
            raise os_failure(self.path, exc) from None
        except BaseException:
            self.abort()
            raise
        log.info("wrote %s: %d shard(s), %d bytes of tensors", self.path, len(self._names), self._total)
        return self.path

    def _write_text(self, name: str, text: str) -> None:
        with open(self._tmp / name, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    def abort(self) -> None:
        """Discard everything written so far (idempotent); the previous output, if any, is untouched."""
        for writer in self._writers:
            writer.abort()
        if not self._committed and hasattr(self, "_tmp"):
            shutil.rmtree(self._tmp, ignore_errors=True)
