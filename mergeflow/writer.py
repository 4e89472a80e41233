"""Atomic, streaming safetensors writer.

The layout of the output (every key's shape and dtype) is known before any tensor is computed, so
the header is written first and each tensor goes straight to its offset: memory holds one tensor
at a time. Bytes go to a hidden ``.NAME.partial-PID`` file beside the target, which is fsynced and
renamed over the target only when every key has been written; on any error it is removed. A
killed process can leave only a ``.partial-`` file behind, never a target that looks complete, and
the next writer into the same place removes such leftovers once their process is gone.

Before anything is opened for writing, :func:`check_output` refuses a target that is one of the
inputs (by any spelling, symlink or hard link) or that exists but is not a regular file (a FIFO, a
device, a directory, a symlink): those are never read and never replaced. Operating-system failures
(no space, read-only filesystem, permission, a parent that is a file) become one
:class:`~mergeflow.errors.OutputError` line naming the path and the cause; the previous target, if
any, is untouched.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType

import torch

from mergeflow.checkpoint import DTYPE_TO_SAFETENSORS, TensorMeta
from mergeflow.errors import CheckpointError, OutputError

log = logging.getLogger("mergeflow.writer")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def partial_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial-{os.getpid()}")


def os_failure(path: str | Path, exc: OSError) -> OutputError:
    """One line for an operating-system failure while writing ``path``."""
    cause = exc.strerror or errno.errorcode.get(exc.errno or 0) or type(exc).__name__
    where = exc.filename if exc.filename and Path(str(exc.filename)).name != Path(path).name else path
    if Path(str(where)).name.startswith(f".{Path(path).name}.partial-"):
        where = path
    return OutputError(f"{where}: cannot write ({cause})")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_leftovers(target: Path, kinds: str = "partial") -> list[Path]:
    """``.NAME.KIND-PID`` entries beside ``target`` (``kinds``: a regex alternative of KINDs) whose
    writing process no longer exists; this process's own are never stale."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?:{kinds})-(\d+)$")
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    stale = []
    for name in names:
        match = pattern.match(name)
        if match is not None and int(match.group(1)) != os.getpid() and not _process_alive(int(match.group(1))):
            stale.append(target.parent / name)
    return stale


def remove_stale_partials(target: Path) -> list[Path]:
    """Delete ``.NAME.partial-PID`` files beside ``target`` whose writing process no longer exists."""
    removed = []
    for leftover in stale_leftovers(target):
        try:
            if stat.S_ISREG(os.lstat(leftover).st_mode):
                leftover.unlink()
                removed.append(leftover)
        except OSError:
            continue
    if removed:
        log.info("removed %d partial file(s) left by killed writers of %s", len(removed), target)
    return removed


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_output(target: str | Path, inputs: Iterable[str | Path] = (), directory: bool = False) -> Path:
    """Refuse an output target that would destroy an input or is not something we may replace.

    ``directory``: the target is a folder of outputs (it may exist as a directory). Nothing is
    opened: only ``lstat``/``stat`` calls are made, so a FIFO or device is never read or written.
    """
    target = Path(target)
    try:
        st = os.lstat(target)
    except (FileNotFoundError, NotADirectoryError):  # the latter: some parent is a file (reported below)
        st = None
    except OSError as exc:
        raise OutputError(f"{target}: cannot inspect the output ({exc.strerror})") from None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise OutputError(f"{target}: the output is a symbolic link; give the real path (links are never replaced)")
        if directory and not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{target}: expected a directory of outputs, found {_kind(st.st_mode)}")
        if not directory and not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{target}: the output exists and is {_kind(st.st_mode)}, not a regular file; refusing")
    for source in inputs:
        if _same_file(target, Path(source)):
            raise OutputError(f"{target}: the output is the input {source}; refusing to overwrite an input")
    check_parent(target)
    return target


def check_parent(target: Path) -> None:
    """Refuse ``target`` when its nearest existing ancestor is not a directory (nothing could be made there)."""
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"{target}: cannot write: {parent} is not a directory")


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISREG, "a file"),
    )
    for test, name in kinds:
        if test(mode):
            return name
    return "not a regular file"


def make_parent(path: Path) -> None:
    """Create ``path``'s parent folders, as an :class:`OutputError` line on failure."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_failure(path, exc) from None


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
        self._committed = False
        check_output(self.path)
        make_parent(self.path)
        remove_stale_partials(self.path)
        self._tmp = partial_path(self.path)
        try:
            self._handle = open(self._tmp, "wb")
        except OSError as exc:
            raise os_failure(self.path, exc) from None
        try:
            self._handle.write(len(encoded).to_bytes(8, "little"))
            self._handle.write(encoded)
        except OSError as exc:
            self.abort()
            raise os_failure(self.path, exc) from None

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
        try:
            self._handle.seek(self._data_start + self._offsets[key])
            self._handle.write(memoryview(data))
        except OSError as exc:
            self.abort()
            raise os_failure(self.path, exc) from None
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
        try:
            if self._final_metadata is not None:
                self._handle.seek(8)
                self._handle.write(encoded + b" " * (room - len(encoded)))
            self._handle.truncate(self._total)
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            check_output(self.path)  # nothing took the target's place meanwhile
            os.replace(self._tmp, self.path)
        except OSError as exc:
            self.abort()
            raise os_failure(self.path, exc) from None
        except BaseException:
            self.abort()
            raise
        fsync_dir(self.path.parent)
        self._committed = True
        return self.path

    def abort(self) -> None:
        """Discard everything written so far (idempotent)."""
        handle = getattr(self, "_handle", None)
        if handle is not None and not handle.closed:
            try:
                handle.close()
            except OSError:  # a failed flush of a file we are discarding anyway
                pass
        if not self._committed and hasattr(self, "_tmp"):
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
    path = check_output(path)
    make_parent(path)
    remove_stale_partials(path)
    tmp = partial_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise os_failure(path, exc) from None
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
