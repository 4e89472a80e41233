"""HTTP(S) downloads that resume, retry, bound their size and verify their sha256.

Bytes go to ``<dest>.part`` beside the destination; an interrupted transfer resumes from there with
a ``Range`` request (or restarts when the server ignores ranges). The file is renamed to ``dest``
only after its size and sha256 check out, so nothing that looks complete is ever left unverified.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from mergeflow.errors import CheckpointError, MergeflowError
from mergeflow.hashing import sha256_file
from mergeflow.writer import fsync_dir

log = logging.getLogger("mergeflow.download")

DEFAULT_MAX_BYTES = 8 << 30  # 8 GiB: larger than any ViT-L/14 checkpoint
_CHUNK = 1 << 20


class DownloadError(MergeflowError):
    """The transfer failed after every retry (network down, server error, size bound exceeded)."""


class HashMismatchError(CheckpointError):
    """The downloaded bytes are not the expected ones."""


def _transfer(url: str, part: Path, max_bytes: int, timeout: float) -> None:
    """One attempt: append to ``part`` from its current size (Range), or restart if unsupported."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "mergeflow"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        status = getattr(response, "status", 200)
        if have and status != 206:  # server ignored the range: start over
            have = 0
        length = response.headers.get("Content-Length")
        if length is not None and have + int(length) > max_bytes:
            raise DownloadError(f"{url}: {have + int(length)} bytes exceeds the limit of {max_bytes}")
        with open(part, "ab" if have else "wb") as out:
            written = have
            while chunk := response.read(_CHUNK):
                written += len(chunk)
                if written > max_bytes:
                    raise DownloadError(f"{url}: more than {max_bytes} bytes, stopping")
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if length is not None and written != have + int(length):
            raise ConnectionError(f"transfer cut at {written} of {have + int(length)} bytes")


def download(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    retries: int = 4,
    timeout: float = 60.0,
    backoff: float = 1.0,
) -> str:
    """Fetch ``url`` to ``dest`` atomically and return its sha256 (checked against ``sha256`` if given).

    Interrupted transfers resume from ``<dest>.part`` on the next attempt or the next call; a hash
    mismatch deletes the partial bytes and raises :class:`HashMismatchError`.
    """
    if not url.startswith(("http://", "https://")):
        raise DownloadError(f"{url}: only http(s) URLs can be downloaded")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last: Exception | None = None
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, max_bytes, timeout)
            break
        except DownloadError:
            part.unlink(missing_ok=True)
            raise
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # range past the end: the partial file is complete or wrong; restart
                part.unlink(missing_ok=True)
            elif 400 <= exc.code < 500 and exc.code not in (408, 429):
                raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
            last = exc
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            last = exc
        if attempt < retries:
            log.warning("%s: attempt %d failed (%s); retrying", url, attempt + 1, last)
            time.sleep(backoff * 2**attempt)
    else:
        raise DownloadError(f"{url}: failed after {retries + 1} attempts ({last}); partial bytes kept in {part}")
    digest = sha256_file(part)
    if sha256 is not None and digest != sha256.lower():
        part.unlink(missing_ok=True)
        raise HashMismatchError(f"{url}: sha256 {digest} does not match the expected {sha256}; download discarded")
    os.replace(part, dest)
    fsync_dir(dest.parent)
    return digest
