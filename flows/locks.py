"""One run per report directory at a time.

Two runs writing the same report directory would interleave their files, so the pipeline flow
takes this lock around everything it writes. A second run *waits* for the first to finish; if it
has waited ``timeout_s`` seconds it fails with one line (a :class:`~mergeflow.errors.MergeflowError`).

- Against a Prefect server (``PREFECT_API_URL`` set) the lock is a Prefect global concurrency
  limit of one slot named after the resolved report directory (:func:`limit_name`): runs on any
  machine that talk to the same server exclude each other, and the UI shows who holds it.
- Always, also an ``fcntl`` lock on ``<report dir>/.mergeflow.lock``: two local runs on the
  ephemeral API (plain ``mergeflow run``, no server) exclude each other too, and so does a local
  run against a served one. The operating system drops it when the holding process dies.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from mergeflow.errors import MergeflowError

log = logging.getLogger("mergeflow.locks")

LOCK_FILE = ".mergeflow.lock"
POLL_S = 0.5


def limit_name(report_dir: str | Path) -> str:
    """The global concurrency limit of a report directory: the same for every spelling of its path."""
    resolved = str(Path(report_dir).expanduser().resolve())
    return f"mergeflow-report-{hashlib.sha256(resolved.encode()).hexdigest()[:16]}"


def api_is_ephemeral() -> bool:
    """True when no Prefect server is configured: runs use a throwaway API in this process's subprocess."""
    from prefect.settings import PREFECT_API_URL

    return not PREFECT_API_URL.value()


def _busy(report_dir: Path, waited: float, how: str) -> MergeflowError:
    return MergeflowError(
        f"{report_dir}: another run is writing this report directory ({how}); gave up after {waited:.0f} s"
    )


@contextmanager
def file_lock(report_dir: str | Path, timeout_s: float) -> Iterator[None]:
    """An exclusive ``fcntl`` lock on ``<report_dir>/.mergeflow.lock``, waited for up to ``timeout_s``."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(report_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    start = time.monotonic()
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited >= timeout_s:
                    raise _busy(report_dir, waited, f"lock file {LOCK_FILE}") from None
                time.sleep(min(POLL_S, max(timeout_s - waited, 0.01)))
        if time.monotonic() - start > POLL_S:
            log.info("%s: waited %.1f s for another local run", report_dir, time.monotonic() - start)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextmanager
def server_limit(report_dir: str | Path, timeout_s: float) -> Iterator[None]:
    """The report directory's global concurrency limit (one slot) on the configured Prefect server."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    name = limit_name(report_dir)
    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(name, limit=1)
        except ObjectAlreadyExists:  # another run created it between our read and our create
            pass
    start = time.monotonic()
    held = ExitStack()
    try:
        held.enter_context(concurrency(name, occupy=1, timeout_seconds=timeout_s, strict=True))
    except TimeoutError:
        raise _busy(Path(report_dir), time.monotonic() - start, f"Prefect concurrency limit {name}") from None
    with held:
        log.info("%s: holding concurrency limit %s", report_dir, name)
        yield


@contextmanager
def report_lock(report_dir: str | Path, timeout_s: float) -> Iterator[None]:
    """Exclusive use of ``report_dir``: the server's concurrency limit when there is a server, and the file lock."""
    deadline = time.monotonic() + timeout_s
    if api_is_ephemeral():
        with file_lock(report_dir, timeout_s):
            yield
        return
    with server_limit(report_dir, timeout_s), file_lock(report_dir, max(deadline - time.monotonic(), 0.0)):
        yield
