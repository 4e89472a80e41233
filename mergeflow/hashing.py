"""Content hashes of files, streamed in chunks, with a stat-keyed cache.

A file's sha256 is remembered in ``$MERGEFLOW_CACHE_DIR/sha256.json`` (default
``~/.cache/mergeflow``) under its real path together with its device, inode, size, and the mtime
and change time (ctime) in nanoseconds; any change to those makes the entry stale and the file is
hashed again. The ctime is what makes the rule safe (git keeps it for the same reason): ``touch``
or ``os.utime`` can put an mtime back after an in-place edit, but every write or ``utime`` call
sets the ctime to the current time, and no unprivileged call can set it back.
File timestamps can be as coarse as a kernel tick, so a file modified within the
same tick as its hashing could keep its stat: like git's "racy" rule, files younger than
``RACY_SECONDS`` are never remembered. ``MERGEFLOW_HASH_CACHE=0`` turns the cache off.

An input stored in several files (a sharded checkpoint, a model directory) is a :class:`FileSet`:
each member is hashed (and cached, and checked fresh) as a file of its own, and the input's sha256
is that of the text ``mergeflow-fileset-v1\n`` followed by one ``NAME\tSHA256\n`` line per member,
NAME being its path relative to the set's root in POSIX form, lines sorted by NAME. A single file
keeps its plain sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_CHUNK = 8 << 20


class HashCancelled(Exception):
    """Raised inside a background hash when its owner no longer needs it."""


def sha256_file(path: str | Path, cancel: threading.Event | None = None) -> str:
    """Hex sha256 of a file's bytes, read in 8 MiB chunks (memory does not grow with file size)."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)  # reused: no fresh pages per chunk
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(view):
            if cancel is not None and cancel.is_set():
                raise HashCancelled(str(path))
            digest.update(view[:count])
    return digest.hexdigest()


def quick_identity(path: str | Path, samples: int = 16, block: int = 1 << 16) -> str:
    """A cheap content digest: file size, the first 1 MiB and ``samples`` evenly spaced blocks.

    Deterministic in the file's bytes, so it can order files canonically; files it cannot tell
    apart need a full :func:`sha256_file` to break the tie.
    """
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    digest.update(size.to_bytes(8, "little"))
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        for i in range(samples):
            handle.seek(max(0, (size - block) * i // max(1, samples - 1)))
            digest.update(handle.read(block))
    return digest.hexdigest()


def _cache_file() -> Path | None:
    if os.environ.get("MERGEFLOW_HASH_CACHE", "1") == "0":
        return None
    root = os.environ.get("MERGEFLOW_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mergeflow")
    return Path(root) / "sha256.json"


def file_state(path: str | Path) -> list[int]:
    """What identifies a file's current bytes without reading them: device, inode, size, mtime, ctime."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _stat_key(path: str | Path) -> tuple[str, list[int]]:
    return os.path.realpath(path), file_state(path)


_cache_lock = threading.Lock()
RACY_SECONDS = 2.0


def _now_ns() -> int:
    """The wall clock the racy rule compares file timestamps with."""
    return time.time_ns()


def _load_entries(cache: Path) -> dict[str, Any]:
    try:
        entries = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _hit(entries: dict[str, Any], path: str | Path) -> str | None:
    name, stat = _stat_key(path)
    entry = entries.get(name)
    if isinstance(entry, dict) and entry.get("stat") == stat and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    return None


def cached_sha256(path: str | Path) -> str | None:
    """The remembered hash of ``path`` if the file is unchanged since it was hashed, else None."""
    cache = _cache_file()
    return None if cache is None else _hit(_load_entries(cache), path)


def _trustworthy(path: str | Path, stat: list[int]) -> bool:
    """Unchanged since ``stat`` was taken, and not modified too recently to trust its timestamps."""
    return _stat_key(path)[1] == stat and _now_ns() - max(stat[3], stat[4]) >= RACY_SECONDS * 1e9


def _store(new: dict[str, Any]) -> None:
    """Merge ``new`` entries into the cache file (atomic replace); best effort."""
    cache = _cache_file()
    if cache is None or not new:
        return
    with _cache_lock:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            entries = _load_entries(cache) | new
            fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=".sha256.")
            with os.fdopen(fd, "w") as handle:
                json.dump(entries, handle)
            os.replace(tmp, cache)
        except OSError:
            pass


def remember_sha256(path: str | Path, digest: str, stat: list[int]) -> None:
    """Record a hash computed for the file state ``stat`` (taken before hashing); best effort."""
    if _trustworthy(path, stat):
        _store({_stat_key(path)[0]: {"stat": stat, "sha256": digest}})


def sha256_file_cached(path: str | Path, cancel: threading.Event | None = None, fresh: bool = False) -> str:
    """sha256 of a file, from the stat-keyed cache when the file is unchanged (``fresh``: always read it)."""
    hit = None if fresh else cached_sha256(path)
    if hit is not None:
        return hit
    _, stat = _stat_key(path)
    digest = sha256_file(path, cancel)
    remember_sha256(path, digest, stat)
    return digest


def sha256_files_cached(paths: Sequence[str | Path]) -> dict[str, str]:
    """sha256 of many files (path -> hex), reading and writing the cache once, not once per file."""
    cache = _cache_file()
    entries = _load_entries(cache) if cache is not None else {}
    out, new = {}, {}
    for path in paths:
        hit = _hit(entries, path)
        if hit is None:
            name, stat = _stat_key(path)
            hit = sha256_file(path)
            if _trustworthy(path, stat):
                new[name] = {"stat": stat, "sha256": hit}
        out[str(path)] = hit
    _store(new)
    return out


FILESET_HEADER = b"mergeflow-fileset-v1\n"


@dataclass(frozen=True)
class FileSet:
    """The files one input is read from: ``files`` inside ``root`` (or ``root`` itself, alone)."""

    root: Path
    files: tuple[Path, ...]

    @property
    def single(self) -> bool:
        """One file that is the input itself: its identity is its plain sha256."""
        return len(self.files) == 1 and Path(self.files[0]) == Path(self.root)

    def named(self) -> list[tuple[str, Path]]:
        """``(name relative to root, path)`` of every member, in canonical (name) order."""
        return sorted((Path(f).relative_to(self.root).as_posix(), Path(f)) for f in self.files)


def fileset_digest(named_hashes: Sequence[tuple[str, str]]) -> str:
    """The sha256 of a file set from its members' ``(name, sha256)``, in the documented canonical form."""
    digest = hashlib.sha256(FILESET_HEADER)
    for name, sha in sorted(named_hashes):
        digest.update(f"{name}\t{sha}\n".encode())
    return digest.hexdigest()


def fileset_sha256_cached(files: FileSet, cancel: threading.Event | None = None, fresh: bool = False) -> str:
    """sha256 identity of an input: its file's hash, or the digest over every member's (cached) hash."""
    if files.single:
        return sha256_file_cached(files.root, cancel, fresh)
    return fileset_digest([(name, sha256_file_cached(path, cancel, fresh)) for name, path in files.named()])


def fileset_quick_identity(files: FileSet) -> str:
    """:func:`quick_identity` of an input (for a set: over every member's, with their names)."""
    if files.single:
        return quick_identity(files.root)
    return fileset_digest([(name, quick_identity(path)) for name, path in files.named()])


def fileset_state(files: FileSet) -> list[list[int]]:
    """:func:`file_state` of every member, in canonical order."""
    return [file_state(path) for _, path in files.named()]


class BackgroundHasher:
    """Full sha256 of several inputs (files or :class:`FileSet`) computed in one background thread
    (cached hashes are instant; ``fresh`` reads every file again)."""

    def __init__(self, paths: Sequence[str | Path | FileSet], fresh: bool = False):
        self._cancel = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        sets = [p if isinstance(p, FileSet) else FileSet(Path(p), (Path(p),)) for p in paths]
        self._futures: list[Future[str]] = [
            self._pool.submit(fileset_sha256_cached, s, self._cancel, fresh) for s in sets
        ]

    def result(self) -> list[str]:
        """Every hash, waiting for the ones still running."""
        return [f.result() for f in self._futures]

    def close(self) -> None:
        """Stop work that is no longer needed; idempotent."""
        self._cancel.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
