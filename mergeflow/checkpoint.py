"""Read checkpoints one tensor at a time.

safetensors files are parsed here directly (an 8-byte little-endian header length, a JSON header,
then raw little-endian tensor bytes) and each tensor is read with ``readinto`` into its own buffer:
nothing is memory-mapped, so resident memory holds only the tensors currently in use.
``.pt``/``.bin`` state dicts go through ``torch.load(weights_only=True)``; anything that would need
arbitrary unpickling is refused unless the caller passes ``trust_pickle=True``.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergeflow.errors import CheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)
DTYPE_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

MAX_HEADER_BYTES = 100 << 20
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of one stored tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


class CheckpointReader:
    """A checkpoint seen as a mapping from key to tensor, loaded on demand."""

    path: Path

    def keys(self) -> list[str]:
        raise NotImplementedError

    def meta(self, key: str) -> TensorMeta:
        raise NotImplementedError

    def load(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    @property
    def metadata(self) -> dict[str, str]:
        return {}

    def close(self) -> None:
        """Release the file handle (idempotent)."""

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


class SafetensorsReader(CheckpointReader):
    """Streaming reader of one ``.safetensors`` file, validating its header against the file size."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._handle = open(self.path, "rb")
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot open ({exc.strerror})") from exc
        try:
            self._entries, self._metadata, self._data_start = self._parse_header()
        except Exception:
            self._handle.close()
            raise

    def _fail(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: not a valid safetensors file: {why}")

    def _parse_header(self) -> tuple[dict[str, tuple[TensorMeta, int, int]], dict[str, str], int]:
        size = os.fstat(self._handle.fileno()).st_size
        prefix = self._handle.read(8)
        if len(prefix) < 8:
            raise self._fail(f"file is {size} bytes, shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise self._fail(f"header length {header_len} does not fit in a {size}-byte file (truncated?)")
        raw = self._handle.read(header_len)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._fail(f"header is not JSON ({exc})") from exc
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._fail("__metadata__ must map strings to strings")
        data_start = 8 + header_len
        data_size = size - data_start
        entries: dict[str, tuple[TensorMeta, int, int]] = {}
        end_max = 0
        for key, info in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise self._fail(f"key {key!r}: malformed entry {info!r}") from exc
            meta = TensorMeta(shape, dtype)
            itemsize = torch.empty((), dtype=dtype).element_size()
            if any(s < 0 for s in shape) or end - begin != meta.numel * itemsize or begin < 0:
                raise self._fail(f"key {key!r}: offsets {begin}..{end} do not match shape {shape} of {info['dtype']}")
            if end > data_size:
                raise self._fail(
                    f"key {key!r}: data ends at byte {end} but the file holds only {data_size} data bytes (truncated)"
                )
            end_max = max(end_max, end)
            entries[key] = (meta, begin, end)
        if end_max != data_size:
            raise self._fail(f"header describes {end_max} data bytes but the file holds {data_size}")
        return entries, metadata, data_start

    def keys(self) -> list[str]:
        return list(self._entries)

    def meta(self, key: str) -> TensorMeta:
        return self._entries[key][0]

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def load(self, key: str) -> torch.Tensor:
        meta, begin, end = self._entries[key]
        out = torch.empty(meta.shape, dtype=meta.dtype)
        if end > begin:
            buffer = memoryview(out.view(-1).view(torch.uint8).numpy())
            self._handle.seek(self._data_start + begin)
            got = self._handle.readinto(buffer)
            if got != end - begin:
                raise CheckpointError(f"{self.path}: key {key!r}: short read ({got} of {end - begin} bytes)")
        return out

    def close(self) -> None:
        self._handle.close()


class StateDictReader(CheckpointReader):
    """A state dict already in memory (from a pickle-based file or built in code)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], path: str | Path = "<memory>"):
        self.path = Path(path)
        self._tensors = dict(tensors)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def meta(self, key: str) -> TensorMeta:
        tensor = self._tensors[key]
        return TensorMeta(tuple(tensor.shape), tensor.dtype)

    def load(self, key: str) -> torch.Tensor:
        return self._tensors[key]


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept a flat ``{name: tensor}`` dict, one wrapped under ``state_dict``/``model``, or a Module."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and len(obj) == 1:
        (only_key,) = obj
        if only_key in ("state_dict", "model") and isinstance(obj[only_key], Mapping | torch.nn.Module):
            return _unwrap_state_dict(obj[only_key], path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return dict(obj)


def load_pickled_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load a ``torch.save``-d state dict; arbitrary objects are refused unless ``trust_pickle``."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        if trust_pickle:
            raise CheckpointError(f"{path}: corrupt pickle ({str(exc).splitlines()[0]})") from exc
        raise CheckpointError(
            f"{path}: refusing to unpickle: the file needs arbitrary code or objects to load; "
            "convert it to safetensors or pass --trust-pickle if you trust its source"
        ) from exc
    except (RuntimeError, EOFError, ValueError, OSError, struct.error) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({first})") from exc
    return _unwrap_state_dict(obj, path)


def sniff_format(path: str | Path) -> str:
    """``safetensors`` (8-byte length then a JSON object) or ``pickle`` (anything else), from the bytes."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path):
        return "safetensors"
    return "pickle"


def open_checkpoint(path: str | Path, trust_pickle: bool = False) -> CheckpointReader:
    """Open a checkpoint by its suffix: ``.safetensors`` streams; pickle formats load eagerly."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return SafetensorsReader(path)
    if path.suffix in PICKLE_SUFFIXES:
        return StateDictReader(load_pickled_state_dict(path, trust_pickle), path)
    raise CheckpointError(f"{path}: unknown checkpoint format (expected .safetensors or one of {PICKLE_SUFFIXES})")


def stored_fingerprint(path: str | Path) -> str | None:
    """The ``mergeflow.fingerprint`` a safetensors output was written with (None if absent or unreadable)."""
    try:
        with SafetensorsReader(path) as reader:
            return reader.metadata.get("mergeflow.fingerprint")
    except CheckpointError:
        return None


def read_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint in memory (for small models, tests and evaluation)."""
    with open_checkpoint(path, trust_pickle) as reader:
        return {key: reader.load(key) for key in reader.keys()}
