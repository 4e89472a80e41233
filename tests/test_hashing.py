"""sha256 of inputs: the stat-keyed cache must never return a stale hash."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from mergeflow.hashing import cached_sha256, quick_identity, sha256_file, sha256_file_cached


def _age(path: Path, seconds: float) -> None:
    past = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(past, past))


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("MERGEFLOW_CACHE_DIR", str(tmp_path / "cache"))
    # The racy rule looks at the change time, which no utime call can move back: let the cache's
    # clock run a minute ahead instead, so that files written by the test count as old enough.
    import mergeflow.hashing as hashing

    monkeypatch.setattr(hashing, "_now_ns", lambda: time.time_ns() + 60 * 10**9)
    return tmp_path / "cache"


def test_sha256_matches_hashlib_across_chunks(tmp_path: Path) -> None:
    data = os.urandom((8 << 20) + 12345)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_cache_hit_for_unchanged_old_file_and_miss_after_change(tmp_path: Path, cache_dir: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 1000)
    _age(path, 60)
    first = sha256_file_cached(path)
    assert cached_sha256(path) == first == hashlib.sha256(b"a" * 1000).hexdigest()
    path.write_bytes(b"b" * 1000)  # same size, same inode
    _age(path, 30)
    assert cached_sha256(path) is None
    assert sha256_file_cached(path) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_recently_modified_files_are_not_remembered(tmp_path: Path, cache_dir: Path, monkeypatch) -> None:
    import mergeflow.hashing as hashing

    monkeypatch.setattr(hashing, "_now_ns", time.time_ns)  # the real clock
    path = tmp_path / "new.bin"
    path.write_bytes(b"x" * 10)
    _age(path, 60)  # an old mtime does not help: the ctime is new
    sha256_file_cached(path)
    assert cached_sha256(path) is None  # could be rewritten within the same timestamp tick


def test_in_place_edit_with_restored_mtime_is_a_miss(tmp_path: Path, cache_dir: Path) -> None:
    """Same size, same inode, mtime put back with utime: only the ctime tells, and it must."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 4096)
    _age(path, 3600)
    before = os.stat(path)
    assert sha256_file_cached(path) == hashlib.sha256(b"a" * 4096).hexdigest()
    with open(path, "r+b") as handle:
        handle.write(b"b")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (before.st_size, before.st_ino, before.st_mtime_ns)
    assert cached_sha256(path) is None
    assert sha256_file_cached(path) == hashlib.sha256(b"b" + b"a" * 4095).hexdigest()


def test_fresh_ignores_the_cache(tmp_path: Path, cache_dir: Path, monkeypatch) -> None:
    import mergeflow.hashing as hashing

    path = tmp_path / "f.bin"
    path.write_bytes(b"q" * 100)
    digest = sha256_file_cached(path)
    reads = []
    monkeypatch.setattr(hashing, "sha256_file", lambda p, cancel=None: reads.append(p) or digest)
    assert sha256_file_cached(path) == digest and reads == []
    assert sha256_file_cached(path, fresh=True) == digest and reads == [path]


def test_cache_can_be_disabled(tmp_path: Path, cache_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("MERGEFLOW_HASH_CACHE", "0")
    path = tmp_path / "f.bin"
    path.write_bytes(b"z")
    _age(path, 60)
    sha256_file_cached(path)
    assert cached_sha256(path) is None and not cache_dir.exists()


def test_quick_identity_depends_on_content(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"\0" * 5000)
    b.write_bytes(b"\0" * 4999 + b"\1")
    c = tmp_path / "c"
    c.write_bytes(b"\0" * 5000)
    assert quick_identity(a) != quick_identity(b) and quick_identity(a) == quick_identity(c)


def test_batch_hashing_writes_the_cache_once_and_agrees(tmp_path: Path, cache_dir: Path, monkeypatch) -> None:
    import mergeflow.hashing as hashing

    files = []
    for i in range(20):
        path = tmp_path / f"f{i}.bin"
        path.write_bytes(bytes([i]) * 100)
        _age(path, 60)
        files.append(path)
    fresh = tmp_path / "fresh.bin"
    fresh.write_bytes(b"new")  # too recent to remember: the clock is real when its turn comes (the 21st check)
    checks = []
    monkeypatch.setattr(
        hashing, "_now_ns", lambda: checks.append(1) or time.time_ns() + (60 * 10**9 if len(checks) <= 20 else 0)
    )
    writes = []
    original = hashing._store
    monkeypatch.setattr(hashing, "_store", lambda new: (writes.append(len(new)), original(new)))
    got = hashing.sha256_files_cached([*files, fresh])
    assert got == {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in [*files, fresh]}
    assert writes == [20]  # one cache write for the batch, without the racy file
    assert all(cached_sha256(p) == got[str(p)] for p in files) and cached_sha256(fresh) is None
    files[3].write_bytes(b"changed!" * 10)
    _age(files[3], 30)
    assert hashing.sha256_files_cached([files[3]])[str(files[3])] == hashlib.sha256(b"changed!" * 10).hexdigest()
