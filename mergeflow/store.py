"""A content-addressed store of acquired checkpoints, with a lock file that pins what was fetched.

Layout under the store root::

    files/ab/<sha256>            every fetched file, named by the sha256 of its bytes
    safetensors/cd/<key>.safetensors  the state dict to merge (after prefix selection, layout
                                 conversion, legacy conversion), with provenance metadata
    lock.json                    source identity -> sha256 of the fetched file, the Hub commit
                                 resolved on first use, and the converted file's key

A source without an expected sha256 gets one on first acquisition, which is enforced afterwards;
a Hub revision given as a branch or tag is pinned to the commit it resolved to. Nothing is
fetched twice: a source whose pinned file is in the store is a cache hit. A pin that turns out to
be wrong (say, a truncated first download) is reported with what is pinned, why the file does not
match, and how to re-pin it (:meth:`ArtifactStore.unpin`, ``mergeflow acquire --repin``).

Files provided by hand in ``--from-dir`` are looked up by names that cannot leave that directory:
no ``..``, no absolute paths, no separators where a plain name is expected, and no symlink that
resolves outside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch

import mergeflow
from mergeflow.checkpoint import SafetensorsReader, load_pickled_state_dict, read_state_dict, sniff_format
from mergeflow.convert import hf_clip_vision_to_open_clip, select_prefix
from mergeflow.download import DownloadError, HashMismatchError, download
from mergeflow.errors import CheckpointError, ConfigError, MergeflowError
from mergeflow.hashing import sha256_file
from mergeflow.legacy import convert_legacy_checkpoint
from mergeflow.sources import (
    HubSource,
    OpenClipSource,
    PathSource,
    Source,
    UrlSource,
    plain_name,
    safe_repo_path,
    url_file_name,
)
from mergeflow.writer import fsync_dir, save_state_dict, write_text_atomic

log = logging.getLogger("mergeflow.store")


class MissingArtifactsError(MergeflowError):
    """Some sources could not be fetched (offline, or the server failed); says how to provide them."""


@dataclass(frozen=True)
class Artifact:
    name: str
    path: Path  # the safetensors file to merge
    sha256: str  # of the fetched file
    source: str  # source identity


def open_clip_hub_source(source: OpenClipSource) -> HubSource:
    """Where open_clip keeps ``model``/``tag`` on the Hub (its own pretrained registry)."""
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(source.model, source.tag)
    repo = (cfg or {}).get("hf_hub", "").strip("/")
    if not repo:
        raise CheckpointError(f"open_clip has no Hub location for {source.model}/{source.tag}")
    return HubSource(
        name=source.name,
        sha256=source.sha256,
        select_prefix=source.select_prefix if source.select_prefix is not None else "visual.",
        convert=source.convert,
        max_bytes=source.max_bytes,
        repo=repo,
        filename="open_clip_pytorch_model.bin",
    )


def resolve(source: Source) -> Source:
    """open_clip names resolve to the Hub file they are published as; other sources stay as they are."""
    return open_clip_hub_source(source) if isinstance(source, OpenClipSource) else source


class ArtifactStore:
    """``hub_cache``: the Hugging Face cache to use (default: huggingface_hub's own)."""

    def __init__(self, root: str | Path, hub_cache: str | Path | None = None):
        self.root = Path(root)
        self.hub_cache = Path(hub_cache) if hub_cache is not None else None
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        (self.root / "safetensors").mkdir(parents=True, exist_ok=True)
        self.lock_path = self.root / "lock.json"

    # -- lock -------------------------------------------------------------------------------
    def lock(self) -> dict[str, dict[str, Any]]:
        try:
            return json.loads(self.lock_path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise CheckpointError(f"{self.lock_path}: corrupt lock file ({exc})") from None

    def _record(self, identity: str, entry: dict[str, Any]) -> None:
        """Merge ``entry`` into the lock entry of ``identity`` and rewrite the lock file atomically."""
        lock = self.lock()
        lock[identity] = {**lock.get(identity, {}), **entry}
        self._write_lock(lock)

    def _write_lock(self, lock: dict[str, dict[str, Any]]) -> None:
        """Replace the lock file with ``lock``."""
        write_text_atomic(self.lock_path, json.dumps(lock, indent=2, sort_keys=True))

    def repin_hint(self, identity: str) -> str:
        """How to drop the pin of ``identity`` so that its next acquisition pins the file it then finds."""
        return (
            f"re-pin it: provide the right file and rerun acquire with --repin {shlex.quote(identity)} "
            f"(or delete the {json.dumps(identity)} entry from {self.lock_path})"
        )

    def _pin_text(self, identity: str, pinned: dict[str, Any]) -> str:
        """``<lock> pins <identity> to sha256 X (N bytes)``: what the lock says about a source."""
        size = f", {pinned['size']} bytes" if isinstance(pinned.get("size"), int) else ""
        return f"{self.lock_path} pins {identity} to sha256 {pinned.get('sha256')}{size} since its first acquisition"

    def unpin(self, key: str) -> list[str]:
        """Drop the lock entry of a source (its identity, or its name when that is unambiguous).

        The pinned file and its converted safetensors are removed from the store too, unless another
        entry still pins them, so the next acquisition fetches, verifies and pins the file anew.
        Returns the identities dropped; a key that matches nothing, or several names, is a ConfigError.
        """
        lock = self.lock()
        if key in lock:
            matches = [key]
        else:
            matches = [identity for identity, entry in lock.items() if entry.get("name") == key]
        if not matches:
            raise ConfigError(f"{self.lock_path}: no pinned source has the identity or name {key!r}")
        if len(matches) > 1:
            raise ConfigError(
                f"{self.lock_path}: name {key!r} matches {len(matches)} pinned sources "
                f"({', '.join(matches)}); give one of these identities instead"
            )
        identity = matches[0]
        entry = lock.pop(identity)
        self._write_lock(lock)
        still_pinned = {other.get("sha256") for other in lock.values()}
        still_converted = {other.get("converted") for other in lock.values()}
        sha256, converted = entry.get("sha256"), entry.get("converted")
        if isinstance(sha256, str) and sha256 not in still_pinned:
            self.file_path(sha256).unlink(missing_ok=True)
        if isinstance(converted, str) and converted not in still_converted:
            self.converted_path(converted).unlink(missing_ok=True)
        log.info("%s: unpinned %s (was sha256 %s)", self.lock_path, identity, sha256)
        return matches

    # -- paths ------------------------------------------------------------------------------
    def file_path(self, sha256: str) -> Path:
        """Where the fetched file with this sha256 lives in the store."""
        return self.root / "files" / sha256[:2] / sha256

    def converted_path(self, key: str) -> Path:
        """Where the converted safetensors with post-processing key ``key`` lives."""
        return self.root / "safetensors" / key[:2] / f"{key}.safetensors"

    def _adopt(self, path: Path, sha256: str, move: bool) -> Path:
        """Put a verified file into the store under its hash (atomically)."""
        target = self.file_path(sha256)
        if target.exists():
            if move:
                path.unlink(missing_ok=True)
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
        if move:
            os.replace(path, tmp)
        else:
            shutil.copyfile(path, tmp)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        return target

    # -- fetching ---------------------------------------------------------------------------
    def _expected(self, source: Source, pinned: dict[str, Any]) -> str | None:
        """The sha256 the fetched file must have: the source's declared one, else the lock's pin."""
        if source.sha256 and pinned.get("sha256") and source.sha256.lower() != pinned["sha256"]:
            raise CheckpointError(
                f"{source.name}: the source now declares sha256 {source.sha256.lower()}, but "
                f"{self._pin_text(source.identity(), pinned)}; {self.repin_hint(source.identity())}"
            )
        return (source.sha256 or pinned.get("sha256") or "").lower() or None

    def _mismatch(self, source: Source, pinned: dict[str, Any], found: str) -> str:
        """Why a file with ``found`` (its sha256 and size) is refused, and what to do about it."""
        if source.sha256:
            return (
                f"{source.name}: {found}, but the source {source.identity()} declares sha256 "
                f"{source.sha256.lower()}; provide the declared file or correct the declared sha256"
            )
        return (
            f"{source.name}: {found}, but {self._pin_text(source.identity(), pinned)}; "
            f"if that pin is wrong (e.g. a truncated first download), {self.repin_hint(source.identity())}"
        )

    def _verify(self, source: Source, path: Path, expected: str | None, pinned: dict[str, Any]) -> str:
        """Check ``path`` against the size limit and the expected sha256; returns its sha256."""
        size = path.stat().st_size
        if size > source.max_bytes:
            raise CheckpointError(f"{source.name}: {path} is {size} bytes, over the limit of {source.max_bytes}")
        digest = sha256_file(path)
        if expected and digest != expected:
            raise CheckpointError(self._mismatch(source, pinned, f"{path} has sha256 {digest} ({size} bytes)"))
        return digest

    def _fetch_hub(self, source: HubSource, pinned: dict[str, Any], expected: str | None) -> tuple[Path, str, dict]:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        revision = pinned.get("commit") or source.revision
        try:
            local = Path(
                hf_hub_download(
                    source.repo,
                    source.filename,
                    revision=revision,
                    repo_type=source.repo_type,
                    cache_dir=self.hub_cache,
                )
            )
        except LocalEntryNotFoundError as exc:
            raise DownloadError(
                f"{source.repo}/{source.filename}@{revision}: not in the local Hub cache ({exc})"
            ) from None
        except OSError as exc:  # network errors surface as OSError subclasses in huggingface_hub
            raise DownloadError(f"{source.repo}/{source.filename}@{revision}: {exc}") from None
        parts = local.parts
        commit = parts[parts.index("snapshots") + 1] if "snapshots" in parts else revision
        digest = self._verify(source, local, expected, pinned)
        return self._adopt(local, digest, move=False), digest, {"commit": commit}

    def fetch(self, source: Source, from_dir: Path | None = None) -> tuple[Path, str]:
        """The fetched file of ``source`` in the store (a cache hit when pinned and present)."""
        source = resolve(source)
        pinned = self.lock().get(source.identity(), {})
        expected = self._expected(source, pinned)
        if expected and self.file_path(expected).exists():
            return self.file_path(expected), expected
        extra: dict[str, Any] = {}
        if from_dir is not None and (candidate := self._offline_candidate(source, from_dir)) is not None:
            digest = self._verify(source, candidate, expected, pinned)
            path = self._adopt(candidate, digest, move=False)
        elif isinstance(source, PathSource):
            local = Path(source.path).expanduser()
            if not local.is_file():
                raise DownloadError(f"{source.name}: no such file {local}")
            digest = self._verify(source, local, expected, pinned)
            path = self._adopt(local, digest, move=False)
        elif isinstance(source, UrlSource):
            tmp = self.root / "downloads" / hashlib.sha256(source.url.encode()).hexdigest()[:16]
            try:
                digest = download(source.url, tmp, expected, max_bytes=source.max_bytes)
            except HashMismatchError as exc:
                raise HashMismatchError(self._mismatch(source, pinned, str(exc))) from None
            path = self._adopt(tmp, digest, move=True)
        else:
            path, digest, extra = self._fetch_hub(source, pinned, expected)
        entry = {"sha256": digest, "name": source.name, "size": path.stat().st_size, **extra}
        self._record(source.identity(), entry)
        return path, digest

    @staticmethod
    def _offline_candidate(source: Source, from_dir: Path) -> Path | None:
        """A manually provided file: ``<dir>/<repo>/<filename>`` for Hub files, ``<dir>/<name>`` otherwise.

        The parts of that path are checked before anything is looked up (plain names, no ``..``), and
        the file found must resolve inside ``from_dir`` (a symlink pointing out of it is refused).
        """
        try:
            if isinstance(source, HubSource):
                parts = [plain_name(part, "repository part") for part in source.repo.split("/")]
                parts += safe_repo_path(source.filename).split("/")
            elif isinstance(source, UrlSource):
                parts = [plain_name(url_file_name(source.url), "last URL segment")]
            else:
                parts = [plain_name(source.name, "source name")]
        except ValueError as exc:
            raise CheckpointError(f"{source.name}: cannot be looked up in --from-dir {from_dir}: {exc}") from None
        root = from_dir.resolve()
        candidate = from_dir.joinpath(*parts)
        if not candidate.exists() and not candidate.is_symlink():
            return None
        resolved = candidate.resolve()
        if not resolved.is_relative_to(root):
            raise CheckpointError(
                f"{source.name}: {candidate} resolves to {resolved}, outside --from-dir {root}; "
                "copy the file into that directory instead of linking to it"
            )
        return resolved if resolved.is_file() else None

    # -- conversion -------------------------------------------------------------------------
    def _post_key(self, source: Source, sha256: str) -> str:
        spec = {
            "sha256": sha256,
            "select_prefix": source.select_prefix,
            "convert": source.convert,
            "legacy_pickle": source.legacy_pickle,
            "exclude_keys": list(source.exclude_keys),
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def _unloadable(self, source: Source, sha256: str, exc: CheckpointError) -> CheckpointError:
        """The error for a fetched file that cannot be loaded: with a re-pin hint when it is only pinned."""
        if source.sha256:
            return CheckpointError(f"{source.name}: {exc}")
        pinned = self.lock().get(source.identity(), {"sha256": sha256})
        return CheckpointError(
            f"{source.name}: {exc}; {self._pin_text(source.identity(), pinned)}; "
            f"if that file was incomplete, {self.repin_hint(source.identity())}"
        )

    def _load(self, source: Source, raw: Path, sha256: str) -> dict[str, torch.Tensor]:
        """The tensors of the fetched file ``raw`` (legacy pickles converted only when opted in)."""
        try:
            if sniff_format(raw) == "safetensors":
                with SafetensorsReader(raw) as reader:
                    return {key: reader.load(key) for key in reader.keys()}
            return load_pickled_state_dict(raw)
        except CheckpointError as exc:
            if "refusing to unpickle" not in str(exc):
                raise self._unloadable(source, sha256, exc) from None
            if not source.legacy_pickle:
                raise CheckpointError(
                    f"{source.name}: {exc}; if this is a pickled whole module from a source you trust, "
                    "set legacy_pickle: true to convert it in a restricted subprocess"
                ) from None
        with tempfile.TemporaryDirectory(dir=self.root) as tmp:
            try:
                converted = convert_legacy_checkpoint(raw, Path(tmp) / "legacy.safetensors")
            except CheckpointError as exc:
                raise self._unloadable(source, sha256, exc) from None
            return read_state_dict(converted)

    def acquire(self, source: Source, from_dir: Path | None = None) -> Artifact:
        """Fetch (or find) ``source`` and return the safetensors file to merge."""
        source = resolve(source)
        raw, sha256 = self.fetch(source, from_dir)
        key = self._post_key(source, sha256)
        target = self.converted_path(key)
        if not target.exists():
            tensors = self._load(source, raw, sha256)
            if source.select_prefix:
                tensors = select_prefix(tensors, source.select_prefix)
            if source.convert == "hf_clip_vision":
                tensors = hf_clip_vision_to_open_clip(tensors)
            if source.exclude_keys:
                tensors = {k: v for k, v in tensors.items() if not any(fnmatchcase(k, g) for g in source.exclude_keys)}
            metadata = {
                "mergeflow.source": source.model_dump_json(),
                "mergeflow.source_sha256": sha256,
                "mergeflow.lock": json.dumps(self.lock().get(source.identity(), {}), sort_keys=True),
                "mergeflow.version": mergeflow.__version__,
            }
            save_state_dict(target, {k: v.contiguous() for k, v in tensors.items()}, metadata)
            log.info("%s: converted %s -> %s", source.name, raw.name, target.name)
        self._record(source.identity(), {"converted": key})
        return Artifact(source.name, target, sha256, source.identity())

    def acquire_all(self, sources: list[Source], from_dir: Path | None = None) -> list[Artifact]:
        """Acquire every source; if any cannot be fetched, say which ones and how to provide them."""
        artifacts, missing = [], []
        for source in sources:
            try:
                artifacts.append(self.acquire(source, from_dir))
            except DownloadError as exc:
                missing.append((source, str(exc)))
        if missing:
            lines = [f"{len(missing)} of {len(sources)} artifact(s) could not be fetched:"]
            for source, why in missing:
                lines.append(f"  - {source.name}: {_where(source)} ({why})")
            lines.append(
                "Provide them by running with network access, or copy each file to --from-dir DIR as "
                "DIR/<repo>/<filename> (Hub files), DIR/<last URL segment> (URLs) or DIR/<name> (others), "
                "or into the Hugging Face cache; set HF_HUB_OFFLINE=1 to use that cache only."
            )
            raise MissingArtifactsError("\n".join(lines))
        return artifacts

    def track_with_dvc(self) -> Path:
        """``dvc add`` the store (run inside a DVC repository); returns the ``.dvc`` file."""
        proc = subprocess.run(["dvc", "add", "-q", str(self.root)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise MergeflowError(f"dvc add {self.root} failed: {proc.stderr.strip().splitlines()[-1:]}")
        return self.root.with_name(self.root.name + ".dvc")


def _where(source: Source) -> str:
    if isinstance(source, HubSource):
        return f"hf://{source.repo}/{source.filename}@{source.revision}"
    if isinstance(source, UrlSource):
        return source.url
    if isinstance(source, OpenClipSource):
        return f"open_clip {source.model}/{source.tag}"
    return source.path
