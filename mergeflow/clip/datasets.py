"""Labelled image datasets of the papers' tasks, read from an ImageFolder tree, torchvision or the
Hugging Face Hub, with the field's validation split.

Validation = a fixed-seed random 10% of *train* (at most 5000 images): the permutation is
``torch.randperm(n, generator=Generator().manual_seed(seed))``, its first n - v entries stay train and
the last v are validation — the same indices as ``torch.utils.data.random_split(train, [n - v, v])``
used by the task-vectors code, so a validation split here is the one the published numbers used
(given the same sample order). The test split is the dataset's own.

Every source yields (PIL RGB image, label) by index and a digest of its content, which goes into the
zoo's data manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image, UnidentifiedImageError

from mergeflow.errors import MergeflowError
from mergeflow.hashing import sha256_files_cached


class DatasetError(MergeflowError):
    """A dataset is missing, incomplete or does not fit its task (one line, with how to fix it)."""


def validation_split(n: int, seed: int = 0, fraction: float = 0.1, cap: int = 5000) -> tuple[list[int], list[int]]:
    """(train indices, validation indices) of a train set of ``n``: v = min(⌊n·fraction⌋, cap)."""
    v = min(int(n * fraction), cap)
    if v <= 0 or v >= n:
        raise DatasetError(f"a train set of {n} examples cannot give a validation split of {fraction:.0%}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[: n - v], perm[n - v :]


class Images(Protocol):
    def __len__(self) -> int: ...
    def image(self, index: int) -> Image.Image: ...
    def labels(self) -> list[int]: ...
    def digest(self) -> str: ...


def _file_hashes(paths: list[Path], content: bool) -> dict[str, str]:
    """sha256 per file (cached by stat), or only its size when ``content`` is False."""
    return sha256_files_cached(paths) if content else {str(p): str(p.stat().st_size) for p in paths}


def _open_rgb(source: str | Path | io.BytesIO, where: str) -> Image.Image:
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"{where}: not a readable image ({exc})") from None


class ImageFolderImages:
    """``root/<class folder>/**/<image>``; labels from the folder names.

    Folder → label: integer names are labels themselves; otherwise ``folders`` (the task's folder names in
    label order) when given, else sorted order (torchvision's ImageFolder). Files are ordered as
    torchvision orders them (class by class, sorted walk), so split indices match its datasets.
    """

    def __init__(self, root: str | Path, classes: int, folders: Sequence[str] | None = None, hash_content: bool = True):
        from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: no such folder (expected one sub-folder per class)")
        names = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        if all(n.isdigit() for n in names) and names:
            mapping = {n: int(n) for n in names}
        elif folders is not None:
            unknown = sorted(set(names) - set(folders))
            if unknown:
                raise DatasetError(f"{self.root}: class folders {unknown[:5]} are not among the task's {list(folders)}")
            mapping = {n: list(folders).index(n) for n in names}
        else:
            mapping = {n: i for i, n in enumerate(names)}
        if len(names) != classes or sorted(mapping.values()) != list(range(classes)):
            raise DatasetError(f"{self.root}: {len(names)} class folders, the task has {classes} classes")
        try:
            samples = make_dataset(str(self.root), mapping, extensions=IMG_EXTENSIONS)
        except FileNotFoundError as exc:
            raise DatasetError(f"{self.root}: {exc}") from None
        self.samples = [(Path(p), label) for p, label in samples]
        self.hash_content = hash_content

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> Image.Image:
        path = self.samples[index][0]
        return _open_rgb(path, str(path))

    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def digest(self) -> str:
        """sha256 over (relative path, label, file sha256) of every sample (file hashes cached by stat)."""
        hashes = _file_hashes([p for p, _ in self.samples], self.hash_content)
        h = hashlib.sha256()
        for path, label in self.samples:
            h.update(f"{path.relative_to(self.root)}\t{label}\t{hashes[str(path)]}\n".encode())
        return h.hexdigest()


_LABEL_ATTRS = ("targets", "labels", "_labels")


class TorchvisionImages:
    """A ``torchvision.datasets`` class read from ``root`` (never downloaded here: ``download=False``)."""

    def __init__(self, name: str, root: str | Path, kwargs: dict[str, Any], hash_content: bool = True):
        import torchvision.datasets as tvd

        if not hasattr(tvd, name):
            raise DatasetError(f"torchvision has no dataset {name!r}")
        self.name, self.root, self.kwargs = name, Path(root), dict(kwargs)
        try:
            self.dataset = getattr(tvd, name)(root=str(self.root), download=False, **self.kwargs)
        except (RuntimeError, FileNotFoundError, OSError) as exc:
            raise DatasetError(
                f"torchvision {name}{self.kwargs} not found under {self.root} ({str(exc).splitlines()[0]}); "
                f"fetch it once with torchvision.datasets.{name}(root='{self.root}', download=True, ...) "
                "on a machine with internet, or point the task at an ImageFolder copy"
            ) from None
        self.hash_content = hash_content
        self._labels: list[int] | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def image(self, index: int) -> Image.Image:
        image = self.dataset[index][0]
        return image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(image).convert("RGB")

    def labels(self) -> list[int]:
        """Labels in sample order, read once (the manifest check and the digest both need them)."""
        if self._labels is None:
            self._labels = self._read_labels()
        return self._labels

    def _read_labels(self) -> list[int]:
        for attr in _LABEL_ATTRS:
            values = getattr(self.dataset, attr, None)
            if values is not None and len(values) == len(self):
                return [int(v) for v in values]
        if self.name == "PCAM":  # targets live in their own HDF5 file: read it, not every image
            dataset: Any = self.dataset
            with dataset.h5py.File(dataset._base_folder / dataset._FILES[dataset._split]["targets"][0]) as targets:
                return [int(v) for v in targets["y"][:].reshape(-1)]
        samples = getattr(self.dataset, "_samples", None)
        if samples is not None:
            return [int(s[1]) for s in samples]
        return [int(self.dataset[i][1]) for i in range(len(self))]  # slow path: decodes every image

    def _files(self) -> list[Path]:
        base = self.root
        for attr in ("raw_folder", "_base_folder", "base_folder"):
            value = getattr(self.dataset, attr, None)
            if value is not None:
                candidate = Path(value) if Path(value).is_absolute() else self.root / value
                if candidate.is_dir():
                    base = candidate
                    break
        return sorted(p for p in base.rglob("*") if p.is_file())

    def digest(self) -> str:
        files = self._files()
        hashes = _file_hashes(files, self.hash_content)
        h = hashlib.sha256(json.dumps({"dataset": self.name, "kwargs": self.kwargs, "n": len(self)}).encode())
        for path in files:
            h.update(f"{path.relative_to(self.root)}\t{hashes[str(path)]}\n".encode())
        h.update(json.dumps(self.labels()).encode())
        return h.hexdigest()


class HubImages:
    """A Hugging Face ``datasets`` split (``repo`` at ``revision``, or ``path`` saved with ``save_to_disk``)."""

    def __init__(self, spec: dict[str, Any], split: str):
        try:
            import datasets
        except ImportError:  # pragma: no cover - a dependency
            raise DatasetError("the Hugging Face `datasets` package is needed for kind: hf") from None
        self.image_column = spec.get("image", "image")
        self.label_column = spec.get("label", "label")
        where = spec.get("path") or spec.get("repo")
        try:
            if spec.get("path"):
                loaded = datasets.load_from_disk(spec["path"])
                self.dataset = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
            else:
                self.dataset = datasets.load_dataset(spec["repo"], split=split, revision=spec.get("revision"))
        except Exception as exc:  # datasets raises many kinds; all mean "not available"
            raise DatasetError(
                f"Hugging Face dataset {where} split {split!r} unavailable ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); download it with internet access or set HF_HOME "
                "to a cache that holds it"
            ) from None
        for column in (self.image_column, self.label_column):
            if column not in self.dataset.column_names:
                raise DatasetError(f"{where}: no column {column!r} (has {self.dataset.column_names})")
        self.where, self.split = where, split

    def __len__(self) -> int:
        return len(self.dataset)

    def image(self, index: int) -> Image.Image:
        value = self.dataset[index][self.image_column]
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict):
            value = value.get("bytes")
        if isinstance(value, bytes | bytearray):
            return _open_rgb(io.BytesIO(value), f"{self.where}[{self.split}][{index}]")
        raise DatasetError(f"{self.where}: column {self.image_column!r} holds {type(value).__name__}, not an image")

    def labels(self) -> list[int]:
        return [int(v) for v in self.dataset[self.label_column]]

    def digest(self) -> str:
        return hashlib.sha256(f"hf:{self.where}:{self.split}:{self.dataset._fingerprint}".encode()).hexdigest()


def open_images(loader: dict[str, Any], data_root: str | Path, split: str, classes: int,
                folders: Sequence[str] | None = None, hash_content: bool = True) -> Images:  # fmt: skip
    """The ``split`` ('train' or 'test') of a task's dataset as described by ``loader``."""
    kind = loader.get("kind")
    if kind == "imagefolder":
        return ImageFolderImages(Path(data_root) / loader[split], classes, folders, hash_content)
    if kind == "torchvision":
        return TorchvisionImages(loader["class"], Path(data_root) / loader.get("root", ""), loader[split], hash_content)
    if kind == "hf":
        return HubImages(loader, loader[split])
    raise DatasetError(f"unknown dataset kind {kind!r}: imagefolder, torchvision or hf")


def checked_labels(images: Images, classes: int, where: str) -> list[int]:
    labels = images.labels()
    bad = [y for y in labels if not 0 <= y < classes]
    if bad:
        raise DatasetError(f"{where}: labels {sorted(set(bad))[:5]} outside 0..{classes - 1}")
    return labels
