"""Where checkpoints come from: typed source declarations (params.yaml / presets).

Each source names one file: a local path, an http(s) URL, a file in a Hugging Face Hub repository
at a revision, or an open_clip pretrained model by name and tag. Optional post-processing turns it
into the state dict that gets merged: ``select_prefix`` keeps (and strips) keys under a prefix,
``convert`` changes layout (HF CLIP vision -> open_clip), and ``legacy_pickle`` opts in to
converting a pickled whole module in an isolated, restricted subprocess.

Names that become file names under ``--from-dir`` (the source name, a Hub repository and filename,
the last segment of a URL) are validated here, so that none can point outside that directory.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

HEX64 = r"^[0-9a-fA-F]{64}$"


def plain_name(value: str, what: str = "name") -> str:
    """``value`` if it is one plain path component (no separator, not '.' or '..'); else a ValueError."""
    if not value or value in (".", "..") or any(ch in value for ch in "/\\\0"):
        raise ValueError(f"unsafe {what} {value!r}: must be one plain file name (no '/' or '\\', not '.' or '..')")
    return value


def url_file_name(url: str) -> str:
    """The last segment of ``url``: the file name a URL source has in ``--from-dir``."""
    return url.rsplit("/", 1)[-1]


class _Source(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="artifact name, unique within a preset (e.g. 'MNIST')")
    sha256: str | None = Field(None, pattern=HEX64, description="expected sha256 of the fetched file")
    select_prefix: str | None = Field(None, description="keep only keys under this prefix, and strip it")
    exclude_keys: tuple[str, ...] = Field((), description="fnmatch globs of keys dropped after conversion")
    convert: Literal["none", "hf_clip_vision"] = Field("none", description="layout conversion after loading")
    legacy_pickle: bool = Field(False, description="opt in: unpickle a whole module in a restricted subprocess")
    max_bytes: int = Field(8 << 30, gt=0, description="refuse files larger than this")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        return plain_name(value, "source name")

    def identity(self) -> str:
        """Stable key of what is fetched (not of the post-processing)."""
        raise NotImplementedError


class PathSource(_Source):
    kind: Literal["path"] = "path"
    path: str

    def identity(self) -> str:
        return f"path:{self.path}"


class UrlSource(_Source):
    kind: Literal["url"] = "url"
    url: str = Field(pattern=r"^https?://")

    @field_validator("url")
    @classmethod
    def _plain_tail(cls, value: str) -> str:
        plain_name(url_file_name(value), f"last URL segment of {value!r}")
        return value

    def identity(self) -> str:
        return f"url:{self.url}"


def safe_repo_path(value: str) -> str:
    """A relative POSIX path inside a repository: no absolute paths, no '..' or '.', no backslashes."""
    path = PurePosixPath(value)
    if (
        not value
        or any(ch in value for ch in "\\\0")
        or path.is_absolute()
        or any(part in ("..", ".", "") for part in value.split("/"))
    ):
        raise ValueError(f"unsafe repository path {value!r}: must be relative, without '..', '.', '\\' or empty parts")
    return value


class HubSource(_Source):
    kind: Literal["hf"] = "hf"
    repo: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
    filename: str
    revision: str = Field("main", description="branch, tag or commit; the resolved commit is pinned on first use")
    repo_type: Literal["model", "dataset"] = "model"

    @field_validator("repo")
    @classmethod
    def _safe_repo(cls, value: str) -> str:
        for part in value.split("/"):
            plain_name(part, f"repository {value!r} part")
        return value

    @field_validator("filename")
    @classmethod
    def _safe(cls, value: str) -> str:
        return safe_repo_path(value)

    def identity(self) -> str:
        return f"hf:{self.repo_type}:{self.repo}:{self.filename}@{self.revision}"


class OpenClipSource(_Source):
    kind: Literal["open_clip"] = "open_clip"
    model: str
    tag: str

    def identity(self) -> str:
        return f"open_clip:{self.model}:{self.tag}"


Source = Annotated[PathSource | UrlSource | HubSource | OpenClipSource, Field(discriminator="kind")]
