"""Atomic, streaming safetensors writer.

The layout of the output (every key's shape and dtype) is known before any tensor is computed, so
the header is written first and each tensor goes straight to its offset: memory holds one tensor
at a time. Bytes go to a hidden ``.NAME.partial-PID`` file beside the target, which is fsynced and
renamed over the target only when every key has been written; on any error it is removed. A
killed process can leave only a ``.partial-`` file behind, never a target that looks complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

import torch

from mergeflow.checkpoint import DTYPE_TO_SAFETENSORS, TensorMeta
from mergeflow.errors import CheckpointError


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def partial_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial-{os.getpid()}")


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort on filesystems without directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class SafetensorsWriter:
    """Write tensors for a fixed layout, in any order, then commit atomically with :meth:`commit`.

    Used as a context manager, leaving the block without ``commit`` (or with an exception) aborts.
    ``final_metadata``, when given, is called at commit and its result replaces ``metadata`` in the
    header (values only known at the end, such as input hashes computed in the background); the
    header keeps ``reserve`` bytes of room for it.
    """

    def __init__(
        self,
        path: str | Path,
        layout: Mapping[str, TensorMeta],
        metadata: Mapping[str, str] | None = None,
        final_metadata: Callable[[], Mapping[str, str]] | None = None,
        reserve: int = 256,
    ):
        self.path = Path(path)
        self._final_metadata = final_metadata
        self.layout = dict(layout)
        # Widest dtypes first keeps every tensor aligned to its element size, as safetensors does.
        order = sorted(self.layout, key=lambda k: (-_itemsize(self.layout[k].dtype), k))
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._offsets: dict[str, int] = {}
        offset = 0
        for key in order:
            meta = self.layout[key]
            if meta.dtype not in DTYPE_TO_SAFETENSORS:
                raise CheckpointError(f"{self.path}: key {key!r}: dtype {meta.dtype} cannot be stored in safetensors")
            nbytes = meta.numel * _itemsize(meta.dtype)
            header[key] = {
                "dtype": DTYPE_TO_SAFETENSORS[meta.dtype],
                "shape": list(meta.shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._offsets[key] = offset
            offset += nbytes
        self._header = header
        encoded = self._encode(metadata)
        if final_metadata is not None:
            encoded += b" " * reserve
        encoded += b" " * (-len(encoded) % 8)
        self._data_start = 8 + len(encoded)
        self._total = self._data_start + offset
        self._written: set[str] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = partial_path(self.path)
        self._handle = open(self._tmp, "wb")
        self._handle.write(len(encoded).to_bytes(8, "little"))
        self._handle.write(encoded)
        self._committed = False

    def _encode(self, metadata: Mapping[str, str] | None) -> bytes:
        header = dict(self._header)
        header.pop("__metadata__", None)
        if metadata:
            header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}, **header}
        return json.dumps(header, separators=(",", ":")).encode()

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Store ``tensor`` under ``key``; its shape and dtype must be the planned ones."""
        meta = self.layout.get(key)
        if meta is None:
            raise KeyError(f"{key!r} is not part of this file's layout")
        if tuple(tensor.shape) != meta.shape or tensor.dtype != meta.dtype:
            raise ValueError(f"{key!r}: got {tuple(tensor.shape)} {tensor.dtype}, planned {meta.shape} {meta.dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._handle.seek(self._data_start + self._offsets[key])
        self._handle.write(memoryview(data))
        self._written.add(key)

    def commit(self) -> Path:
        """Check completeness, fsync, and rename the partial file onto the target."""
        missing = set(self.layout) - self._written
        if missing:
            self.abort()
            raise CheckpointError(f"{self.path}: {len(missing)} keys were never written, e.g. {sorted(missing)[:3]}")
        if self._final_metadata is not None:
            encoded = self._encode(self._final_metadata())
            room = self._data_start - 8
            if len(encoded) > room:
                self.abort()
                raise CheckpointError(f"{self.path}: final metadata needs {len(encoded)} header bytes, {room} reserved")
            self._handle.seek(8)
            self._handle.write(encoded + b" " * (room - len(encoded)))
        self._handle.truncate(self._total)
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)
        self._committed = True
        return self.path

    def abort(self) -> None:
        """Discard everything written so far (idempotent)."""
        if not self._handle.closed:
            self._handle.close()
        if not self._committed:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._committed:
            self.abort()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file atomically: a hidden partial file beside it, fsynced, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_state_dict(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Atomically write a whole in-memory state dict as safetensors."""
    layout = {k: TensorMeta(tuple(t.shape), t.dtype) for k, t in tensors.items()}
    with SafetensorsWriter(path, layout, metadata) as writer:
        for key, tensor in tensors.items():
            writer.write(key, tensor)
        return writer.commit()
