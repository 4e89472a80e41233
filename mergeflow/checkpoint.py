"""Read checkpoints one tensor at a time.

safetensors files are parsed here directly (an 8-byte little-endian header length, a JSON header,
then raw little-endian tensor bytes) and each tensor is read with ``readinto`` into its own buffer:
nothing is memory-mapped, so resident memory holds only the tensors currently in use. The header is
held to the rules of the ``safetensors`` library (see :meth:`SafetensorsReader._parse_header`): what
that library refuses is refused here, with one line that says why.

``.pt``/``.bin`` state dicts go through ``torch.load(weights_only=True)``; anything that would need
arbitrary unpickling is refused unless the caller passes ``trust_pickle=True``. A zip-format torch
save (``torch.save``'s format since 1.6) is memory-mapped (``mmap=True``): its tensors are paged in
from the file as they are used, not loaded whole; the legacy format cannot be mapped and is loaded
whole.

The format is recognised from the first bytes, never from the suffix (:func:`sniff_format`), and
only regular files are ever opened: a FIFO or a device is refused from ``stat`` alone.

Checkpoints made of several files are read as one (:class:`ModelDirectoryReader`):

- a sharded checkpoint, given as its index (``model.safetensors.index.json``, or any JSON file with
  a ``weight_map``) or as the directory that holds it; every shard is opened and checked as a file
  of its own, and the index must describe the shards exactly (a shard it names exists, every key
  sits in exactly one shard, the one the index names, and every key of every shard is listed);
- a Hugging Face model directory: ``config.json`` beside ``model.safetensors``, its shards, or
  ``pytorch_model.bin`` (or its shards); safetensors is preferred when both are there.

Such an input is identified by every file mergeflow reads or copies from it (:attr:`CheckpointReader.files`:
the index, the shards, and in a directory ``config.json`` and the tokenizer/processor files of
:data:`COMPANION_PATTERNS`), in the canonical order of their names relative to the directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import stat
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import IO, Any

import torch

from mergeflow.errors import CheckpointError

log = logging.getLogger(__name__)

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
for _name, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E8M0", "float8_e8m0fnu"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("C64", "complex64"),
):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)
DTYPE_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# Bits per element of every dtype the safetensors format defines (its own table, torch aside).
_SAFETENSORS_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "C64": 64,
}

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit
MAX_JSON_DEPTH = 127  # serde_json's recursion limit: deeper headers are refused by the library
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_U64_LIMIT = 1 << 64
_JSON_WHITESPACE = b" \t\n\r"
_ZIP_MAGIC = b"PK\x03\x04"
# torch.save's legacy (non-zip) format starts with a pickled int: this magic number, little-endian.
_TORCH_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_SNIFF_BYTES = 64


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

    @property
    def root(self) -> Path:
        """The directory the names in :attr:`files` are relative to (the file itself for one file)."""
        return self.path

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file this checkpoint is read from, in canonical order (one file: just ``path``)."""
        return (self.path,)

    @property
    def model_type(self) -> str | None:
        """``config.json``'s ``model_type`` for a model directory that has one (else None)."""
        return None

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


# --- opening files ------------------------------------------------------------------------------


def _file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a file"


def _one_line(text: str, limit: int = 200) -> str:
    """The first line of ``text``, without terminal escapes, cut to ``limit`` characters."""
    line = re.sub(r"\x1b\[[0-9;]*m", "", text).strip().split("\n", 1)[0].strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _open_regular(path: Path) -> IO[bytes]:
    """Open ``path`` for reading if it is a readable regular file, else raise a one-line CheckpointError.

    The file type is checked with ``stat`` before anything is opened (opening a FIFO for reading blocks
    until a writer appears), and again on the descriptor, opened non-blocking, in case the path was
    swapped in between.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot stat ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path}: not a regular file ({_file_kind(info.st_mode)})")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except PermissionError:
        raise CheckpointError(f"{path}: not readable (permission denied)") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open ({exc.strerror or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CheckpointError(f"{path}: not a regular file ({_file_kind(mode)})")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _sniff_handle(handle: IO[bytes]) -> tuple[str, bytes, int]:
    """``(kind, first bytes, size)`` of an open file; kind is ``safetensors``, ``pickle`` or ``unknown``.

    safetensors: a header length within the library's limit followed (after JSON whitespace) by ``{``;
    the length is not required to fit, so a truncated file is still reported as a truncated safetensors.
    pickle: a zip archive (``torch.save``'s format since 1.6) or a legacy torch pickle (protocol byte
    0x80, then torch's magic number).
    """
    size = os.fstat(handle.fileno()).st_size
    handle.seek(0)
    head = handle.read(_SNIFF_BYTES)
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if 0 < header_len <= MAX_HEADER_BYTES:
            stop = min(8 + header_len, size)
            chunk, offset = head[8:stop], 8
            while True:
                stripped = chunk.lstrip(_JSON_WHITESPACE)
                if stripped:
                    if stripped[:1] == b"{":
                        return "safetensors", head, size
                    break
                offset += len(chunk)
                if offset >= stop:
                    break
                handle.seek(offset)
                chunk = handle.read(min(1 << 16, stop - offset))
                if not chunk:
                    break
    if head.startswith(_ZIP_MAGIC):
        return "pickle", head, size
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and _TORCH_LEGACY_MAGIC in head[:32]:
        return "pickle", head, size
    return "unknown", head, size


def _not_a_checkpoint(path: Path, head: bytes, size: int) -> CheckpointError:
    """The error for a file that is neither safetensors nor a torch pickle, with a hint at what it is."""
    if size == 0:
        what = "the file is empty"
    elif head[:1] == b"\x80":
        what = "a Python pickle that torch.save did not write (no torch magic number)"
    else:
        what = f"{size} bytes starting with {head[:8]!r}"
    return CheckpointError(
        f"{path}: not a checkpoint: neither safetensors nor a torch pickle (unknown checkpoint format; {what})"
    )


def sniff_format(path: str | Path) -> str:
    """``safetensors``, ``pickle`` (zip or legacy torch pickle) or ``unknown``, from the bytes, not the name.

    Raises CheckpointError when ``path`` is missing, not a regular file or not readable.
    """
    with _open_regular(Path(path)) as handle:
        return _sniff_handle(handle)[0]


# --- safetensors --------------------------------------------------------------------------------


class _HeaderSyntaxError(Exception):
    """The header text is not JSON as serde_json (the safetensors library's parser) reads it."""


class _DuplicateKeyError(Exception):
    """An object in the header names the same key twice."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for json.loads: a dict, refusing repeated keys (json.loads keeps the last)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def _refuse_constant(name: str) -> Any:
    """``parse_constant`` for json.loads: NaN and Infinity are Python extensions, not JSON."""
    raise _HeaderSyntaxError(f"{name} is not a JSON value")


def _parse_int(literal: str) -> int | float:
    """``parse_int`` for json.loads, matching serde_json: ``-0`` is a float, and a number beyond f64 is refused."""
    if literal == "-0":
        return -0.0
    if len(literal) > 400:
        raise _HeaderSyntaxError("number out of range")
    value = int(literal)
    try:
        float(value)
    except OverflowError:
        raise _HeaderSyntaxError("number out of range") from None
    return value


def _parse_float(literal: str) -> float:
    """``parse_float`` for json.loads: a number that overflows f64 is refused, as serde_json does."""
    value = float(literal)
    if not math.isfinite(value):
        raise _HeaderSyntaxError("number out of range")
    return value


def _check_strings_and_depth(obj: Any) -> None:
    """Refuse lone UTF-16 surrogates (``"\\ud800"``) and nesting deeper than serde_json allows."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            item.encode("utf-8")  # UnicodeEncodeError on a lone surrogate
        elif isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise _HeaderSyntaxError(f"nested more than {MAX_JSON_DEPTH} levels deep")
            if isinstance(item, dict):
                for key in item:
                    key.encode("utf-8")
                stack.extend((value, depth + 1) for value in item.values())
            else:
                stack.extend((value, depth + 1) for value in item)


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, with its article."""
    for kind, name in ((bool, "a boolean"), (dict, "an object"), (list, "an array"), (str, "a string")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else "a number"


def _is_u64(value: Any) -> bool:
    """An unsigned 64-bit integer as JSON gives it (a bool is not one)."""
    return type(value) is int and 0 <= value < _U64_LIMIT


class SafetensorsReader(CheckpointReader):
    """Streaming reader of one ``.safetensors`` file, validating its header against the file size."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._handle = _open_regular(self.path)
        try:
            self._entries, self._metadata, self._data_start = self._parse_header()
        except BaseException:
            self._handle.close()
            raise

    def _fail(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: not a valid safetensors file: {why}")

    def _decode_json(self, raw: bytes) -> Any:
        """The header as Python objects, refusing what serde_json refuses and any repeated key."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._fail(f"header is not valid UTF-8 (byte {exc.start} of the header)") from None
        try:
            header = json.loads(
                text,
                object_pairs_hook=_no_duplicates,
                parse_constant=_refuse_constant,
                parse_int=_parse_int,
                parse_float=_parse_float,
            )
            _check_strings_and_depth(header)
        except _DuplicateKeyError as exc:
            raise self._fail(f"header repeats key {exc.key!r} (ambiguous: which one is meant?)") from None
        except _HeaderSyntaxError as exc:
            raise self._fail(f"header is not JSON ({exc})") from None
        except UnicodeEncodeError:
            raise self._fail("header is not JSON (a string holds a lone UTF-16 surrogate escape)") from None
        except RecursionError:
            raise self._fail(f"header is not JSON (nested more than {MAX_JSON_DEPTH} levels deep)") from None
        except ValueError as exc:  # json.JSONDecodeError and int() limits
            raise self._fail(f"header is not JSON ({_one_line(str(exc))})") from None
        return header

    def _entry(self, key: str, info: Any) -> tuple[TensorMeta, int, int, int]:
        """``(meta, begin, end, byte size from shape and dtype)`` of one header entry."""
        if not isinstance(info, dict):
            raise self._fail(f"key {key!r}: entry is {_json_type(info)}, not an object")
        for field in ("dtype", "shape", "data_offsets"):
            if field not in info:
                raise self._fail(f"key {key!r}: entry has no {field!r}")
        name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(name, str) or name not in _SAFETENSORS_BITS:
            raise self._fail(f"key {key!r}: unknown dtype {name!r}")
        bits = _SAFETENSORS_BITS[name]
        if bits % 8:
            raise self._fail(f"key {key!r}: dtype {name} packs values below a byte; mergeflow does not read it")
        if name not in SAFETENSORS_DTYPES:
            raise self._fail(f"key {key!r}: dtype {name} is not supported by this torch build")
        if not isinstance(shape, list) or not all(_is_u64(s) for s in shape):
            raise self._fail(f"key {key!r}: shape {shape!r} is not a list of non-negative 64-bit integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
            raise self._fail(f"key {key!r}: data_offsets {offsets!r} is not a pair of non-negative 64-bit integers")
        numel = 1
        for dim in shape:  # in order, as the library does: an overflow before a zero still counts
            numel *= dim
            if numel >= _U64_LIMIT:
                raise self._fail(f"key {key!r}: shape {shape} overflows 64 bits")
        if numel * bits >= _U64_LIMIT:
            raise self._fail(f"key {key!r}: shape {shape} of {name} overflows 64 bits")
        dtype = SAFETENSORS_DTYPES[name]
        if numel == 0:  # no bytes bound the dimensions: ask torch whether it can hold this shape
            try:
                torch.empty(0, dtype=dtype).reshape(shape)
            except (RuntimeError, TypeError, ValueError, OverflowError) as exc:
                raise self._fail(f"key {key!r}: torch cannot hold shape {shape} ({_one_line(str(exc), 80)})") from None
        begin, end = offsets
        return TensorMeta(tuple(shape), dtype), begin, end, numel * bits // 8

    def _parse_header(self) -> tuple[dict[str, tuple[TensorMeta, int, int]], dict[str, str], int]:
        """Parse and validate the header, refusing what the safetensors library refuses.

        The rules (safetensors 0.8): at least 8 bytes; a header length of at most 100,000,000 that fits in
        the file; a UTF-8 header holding one JSON object (JSON whitespace around it allowed, nothing
        else, nesting at most 127 deep, no NaN, no out-of-range number, no lone surrogate);
        ``__metadata__`` null or an object of strings; every other key an object with a known
        ``dtype``, a ``shape`` of unsigned integers and two unsigned ``data_offsets`` (other fields
        ignored); sorted by ``(begin, end)`` the offsets run contiguously from 0, each range holding
        exactly ``numel * itemsize`` bytes without 64-bit overflow, and the last one ends at the end of
        the file. Stricter than the library, on purpose: a key repeated in any JSON object (the library
        keeps the last tensor of a repeated name), entries written as arrays or dtypes as objects
        (serde artefacts), and sub-byte dtypes (F4, F6_*) are refused.
        """
        size = os.fstat(self._handle.fileno()).st_size
        prefix = self._handle.read(8)
        if len(prefix) < 8:
            raise self._fail(f"file is {size} bytes, shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            raise self._fail(f"header length {header_len} exceeds the format's limit of {MAX_HEADER_BYTES} bytes")
        if 8 + header_len > size:
            raise self._fail(f"header length {header_len} does not fit in a {size}-byte file (truncated?)")
        raw = self._handle.read(header_len)
        if len(raw) != header_len:
            raise self._fail(f"short read of the header ({len(raw)} of {header_len} bytes; truncated?)")
        header = self._decode_json(raw)
        if not isinstance(header, dict):
            raise self._fail(f"header is {_json_type(header)}, not a JSON object")
        metadata = header.pop("__metadata__", None)
        if metadata is None:
            metadata = {}
        elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._fail("__metadata__ must be an object mapping strings to strings")
        data_start = 8 + header_len
        data_size = size - data_start
        parsed = {key: self._entry(key, info) for key, info in header.items()}
        start, previous = 0, None
        for key, (_, begin, end, nbytes) in sorted(parsed.items(), key=lambda item: (item[1][1], item[1][2])):
            if end < begin:
                raise self._fail(f"key {key!r}: data_offsets [{begin}, {end}] end before they begin")
            if begin > start:
                after = "data starts at byte 0"
                if previous is not None:
                    after = f"the previous tensor {previous!r} ends at byte {start}"
                raise self._fail(f"key {key!r}: gap before its data: it starts at byte {begin}, but {after}")
            if begin < start:
                raise self._fail(
                    f"key {key!r}: bytes {begin}..{end} overlap tensor {previous!r}, which ends at byte {start}"
                )
            if end - begin != nbytes:
                meta = parsed[key][0]
                raise self._fail(
                    f"key {key!r}: offsets {begin}..{end} hold {end - begin} bytes, "
                    f"but shape {list(meta.shape)} of {DTYPE_TO_SAFETENSORS[meta.dtype]} needs {nbytes}"
                )
            start, previous = end, key
        if start < data_size:
            raise self._fail(
                f"header describes {start} data bytes but the file holds {data_size} (extra bytes at the end)"
            )
        if start > data_size:
            raise self._fail(f"header describes {start} data bytes but the file holds only {data_size} (truncated)")
        entries = {key: (meta, begin, end) for key, (meta, begin, end, _) in parsed.items()}
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
        flat = torch.empty(meta.numel, dtype=meta.dtype)
        if end > begin:
            buffer = memoryview(flat.view(torch.uint8).numpy())
            try:
                self._handle.seek(self._data_start + begin)
                got = 0
                while got < end - begin:
                    count = self._handle.readinto(buffer[got:])
                    if not count:
                        break
                    got += count
            except OSError as exc:
                raise CheckpointError(f"{self.path}: key {key!r}: read failed ({exc.strerror or exc})") from None
            if got != end - begin:
                raise CheckpointError(
                    f"{self.path}: key {key!r}: short read ({got} of {end - begin} bytes; the file shrank?)"
                )
        return flat.reshape(meta.shape)

    def close(self) -> None:
        self._handle.close()


# --- pickles ------------------------------------------------------------------------------------


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


_WEIGHTS_ONLY_REASONS = (
    r"Unsupported global: GLOBAL \S+",
    r"unsupported GLOBAL \S+",
    r"Unsupported operand \S+",
    r"WeightsUnpickler error: *[^\s].*",
)


def _weights_only_reason(exc: Exception) -> str:
    """The reason torch's weights-only unpickler gives, in a few words (empty if none is found)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    for pattern in _WEIGHTS_ONLY_REASONS:
        found = re.search(pattern, text)
        if found:
            return _one_line(found.group(0).rstrip("."), 120)
    return ""


def _mappable_name(handle: IO[bytes], path: Path) -> str | None:
    """A file name ``torch.load(mmap=True)`` can map for the open ``handle`` (None: load it whole).

    ``/proc/self/fd/N`` names the open descriptor itself; elsewhere the path is used, unless it ends in
    ``.safetensors`` (which torch.load would read as safetensors).
    """
    by_descriptor = f"/proc/self/fd/{handle.fileno()}"
    if os.path.exists(by_descriptor):
        return by_descriptor
    if path.suffix == ".safetensors":
        return None
    return str(path)


def load_pickled_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load a ``torch.save``-d state dict; arbitrary objects are refused unless ``trust_pickle``.

    Only a zip archive or a legacy torch pickle (recognised from its bytes) is handed to ``torch.load``.
    A zip archive is memory-mapped (tensors are views of the file's pages, read as they are used), through
    the already opened descriptor where the platform names it (``/proc/self/fd``), so the file mapped is
    the one that was checked; a legacy pickle is loaded whole.
    """
    path = Path(path)
    with _open_regular(path) as handle:
        kind, head, size = _sniff_handle(handle)
        if kind == "safetensors":
            raise CheckpointError(f"{path}: is a safetensors file, not a torch pickle")
        if kind != "pickle":
            raise _not_a_checkpoint(path, head, size)
        handle.seek(0)
        mappable = _mappable_name(handle, path) if head.startswith(_ZIP_MAGIC) else None
        source: IO[bytes] | str = handle if mappable is None else mappable
        mapped = mappable is not None
        try:
            # the open file (or its descriptor's name), not the path: torch.load reads any path ending in
            # .safetensors as safetensors
            obj = torch.load(source, map_location="cpu", weights_only=not trust_pickle, mmap=mapped)
        except pickle.UnpicklingError as exc:
            if trust_pickle:
                raise CheckpointError(f"{path}: corrupt pickle ({_one_line(str(exc))})") from exc
            reason = _weights_only_reason(exc)
            raise CheckpointError(
                f"{path}: refusing to unpickle: the file needs arbitrary code or objects to load"
                + (f" ({reason})" if reason else "")
                + "; convert it to safetensors or pass --trust-pickle if you trust its source"
            ) from exc
        except Exception as exc:  # torch.load raises whatever its zip reader or the unpickler raises
            first = _one_line(str(exc)) or type(exc).__name__
            raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({first})") from exc
    return _unwrap_state_dict(obj, path)


def _open_file(path: Path, trust_pickle: bool) -> CheckpointReader:
    """Open one checkpoint file by its content (safetensors streams; torch pickles are mapped or loaded)."""
    with _open_regular(path) as handle:
        kind, head, size = _sniff_handle(handle)
    if kind == "safetensors" or (kind == "unknown" and path.suffix == ".safetensors"):
        if path.suffix != ".safetensors":
            log.info("%s: reading it as safetensors (its content), whatever its name says", path)
        return SafetensorsReader(path)
    if kind == "pickle":
        if path.suffix == ".safetensors":
            log.warning("%s: named .safetensors but holds a torch pickle; loading it as a pickle", path)
        return StateDictReader(load_pickled_state_dict(path, trust_pickle), path)
    if head.lstrip(_JSON_WHITESPACE)[:1] == b"{":
        return ModelDirectoryReader.from_index(path, trust_pickle)
    raise _not_a_checkpoint(path, head, size)


def open_checkpoint(path: str | Path, trust_pickle: bool = False) -> CheckpointReader:
    """Open a checkpoint: a file by its content, a sharded checkpoint's index, or a model directory.

    Files: safetensors streams; torch pickles are memory-mapped (zip format) or loaded (legacy); a
    JSON file is read as the index of a sharded checkpoint. The suffix only breaks a tie: a file named
    ``.safetensors`` whose bytes are neither format is parsed as safetensors, to name what is wrong
    with it. A directory is read as a model directory (see :meth:`ModelDirectoryReader.from_directory`).
    """
    path = Path(path)
    try:
        is_dir = stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        is_dir = False  # _open_regular names the problem
    if is_dir:
        return ModelDirectoryReader.from_directory(path, trust_pickle)
    return _open_file(path, trust_pickle)


# --- checkpoints of several files ---------------------------------------------------------------

# What a model directory holds besides its weights and mergeflow reads or carries over to a merge of
# it (top-level regular files whose name matches one of these fnmatch patterns).
COMPANION_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "*.tiktoken",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor_config.json",
    "feature_extractor_config.json",
    "video_preprocessor_config.json",
)
# The weights of a model directory, in order of preference: (file name, is it an index).
_DIRECTORY_WEIGHTS: tuple[tuple[str, bool], ...] = (
    ("model.safetensors.index.json", True),
    ("model.safetensors", False),
    ("pytorch_model.bin.index.json", True),
    ("pytorch_model.bin", False),
)
MAX_INDEX_BYTES = 100_000_000


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def companion_files(directory: Path) -> list[Path]:
    """The files of :data:`COMPANION_PATTERNS` that ``directory`` holds, sorted by name."""
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise CheckpointError(f"{directory}: cannot list the directory ({exc.strerror or exc})") from None
    return [
        directory / name
        for name in names
        if any(fnmatchcase(name, pattern) for pattern in COMPANION_PATTERNS) and _is_regular(directory / name)
    ]


def _read_index(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """``(weight_map, metadata)`` of a shard index, refusing anything malformed in one line."""

    def fail(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a valid shard index: {why}")

    with _open_regular(path) as handle:
        raw = handle.read(MAX_INDEX_BYTES + 1)
    if len(raw) > MAX_INDEX_BYTES:
        raise fail(f"larger than {MAX_INDEX_BYTES} bytes")
    try:
        index = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except UnicodeDecodeError as exc:
        raise fail(f"not UTF-8 (byte {exc.start})") from None
    except _DuplicateKeyError as exc:
        raise fail(f"repeats key {exc.key!r} (ambiguous: which shard is meant?)") from None
    except (_HeaderSyntaxError, ValueError, RecursionError) as exc:
        raise fail(f"not JSON ({_one_line(str(exc), 120)})") from None
    if not isinstance(index, dict):
        raise fail(f"it is {_json_type(index)}, not a JSON object")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise fail("no 'weight_map' object mapping tensor names to shard files")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise fail(f"key {key!r} maps to {_json_type(shard)}, not a shard file name")
        parts = Path(shard).parts
        if Path(shard).is_absolute() or ".." in parts or "\\" in shard:
            raise fail(f"key {key!r} maps to {shard!r}, which is not a file name inside the index's directory")
    metadata = index.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise fail(f"'metadata' is {_json_type(metadata)}, not an object")
    return weight_map, metadata


class ModelDirectoryReader(CheckpointReader):
    """One checkpoint stored in several files: shards (with their index) and a model directory's files.

    Every shard is opened as a checkpoint file of its own (safetensors streams key by key, pickles are
    memory-mapped), so loading a key reads that key's bytes only. ``path`` is what the caller gave (the
    directory or the index file); :attr:`files` lists every file read or carried over.
    """

    def __init__(
        self,
        path: Path,
        root: Path,
        shards: Sequence[CheckpointReader],
        owner: Mapping[str, int],
        extra_files: Sequence[Path] = (),
        index_metadata: Mapping[str, Any] | None = None,
    ):
        self.path = path
        self._root = root
        self._shards = list(shards)
        self._owner = dict(owner)
        self.index_metadata: dict[str, Any] = dict(index_metadata or {})
        names = {*(r.path for r in self._shards), *extra_files}
        self._files = tuple(sorted(names, key=lambda f: f.relative_to(root).as_posix()))

    @classmethod
    def from_directory(cls, directory: Path, trust_pickle: bool = False) -> ModelDirectoryReader:
        """A model directory: its index and shards, or its one weights file, plus its companion files."""
        for name, is_index in _DIRECTORY_WEIGHTS:
            candidate = directory / name
            if os.path.lexists(candidate):
                if is_index:
                    return cls.from_index(candidate, trust_pickle, path=directory)
                reader = _open_file(candidate, trust_pickle)
                try:
                    extras = companion_files(directory)
                    return cls(directory, directory, [reader], dict.fromkeys(reader.keys(), 0), extras)
                except BaseException:
                    reader.close()
                    raise
        wanted = ", ".join(name for name, _ in _DIRECTORY_WEIGHTS)
        raise CheckpointError(f"{directory}: a directory without a checkpoint (none of {wanted})")

    @classmethod
    def from_index(cls, index: Path, trust_pickle: bool = False, path: Path | None = None) -> ModelDirectoryReader:
        """A sharded checkpoint from its index; ``path`` (default: the index) is how it is named."""
        root = index.parent
        weight_map, metadata = _read_index(index)
        shard_names = sorted(set(weight_map.values()))
        for name in shard_names:
            if not os.path.lexists(root / name):
                raise CheckpointError(f"{index}: names shard {name!r}, which does not exist in {root}")
        shards: list[CheckpointReader] = []
        try:
            for name in shard_names:
                shards.append(_open_file(root / name, trust_pickle))
            owner: dict[str, int] = {}
            for number, shard in enumerate(shards):
                for key in shard.keys():
                    if key in owner:
                        first, second = shard_names[owner[key]], shard_names[number]
                        raise CheckpointError(f"{index}: key {key!r} is in two shards, {first} and {second}")
                    owner[key] = number
            for key, name in weight_map.items():
                if key not in owner:
                    raise CheckpointError(f"{index}: maps key {key!r} to shard {name}, which does not hold it")
                if name != shard_names[owner[key]]:
                    raise CheckpointError(
                        f"{index}: maps key {key!r} to shard {name}, which does not hold it "
                        f"(it is in {shard_names[owner[key]]})"
                    )
            for key, number in owner.items():
                if key not in weight_map:
                    raise CheckpointError(
                        f"{index}: shard {shard_names[number]} holds key {key!r}, which the index does not list"
                    )
            extras = [index, *(companion_files(root) if path is not None else ())]
            return cls(path or index, root, shards, owner, extras, metadata)
        except BaseException:
            for shard in shards:
                shard.close()
            raise

    @property
    def root(self) -> Path:
        return self._root

    @property
    def files(self) -> tuple[Path, ...]:
        return self._files

    @property
    def shards(self) -> list[CheckpointReader]:
        return list(self._shards)

    @property
    def model_type(self) -> str | None:
        config = self._root / "config.json"
        if config not in self._files:
            return None
        try:
            with _open_regular(config) as handle:
                parsed = json.loads(handle.read(MAX_INDEX_BYTES).decode("utf-8"))
        except (CheckpointError, OSError, ValueError):
            return None
        found = parsed.get("model_type") if isinstance(parsed, dict) else None
        return found if isinstance(found, str) else None

    def keys(self) -> list[str]:
        return list(self._owner)

    def meta(self, key: str) -> TensorMeta:
        return self._shards[self._owner[key]].meta(key)

    def load(self, key: str) -> torch.Tensor:
        return self._shards[self._owner[key]].load(key)

    @property
    def metadata(self) -> dict[str, str]:
        """The safetensors metadata every shard agrees on (a key with different values is left out)."""
        common = self._shards[0].metadata
        for shard in self._shards[1:]:
            theirs = shard.metadata
            common = {k: v for k, v in common.items() if theirs.get(k) == v}
        return common

    def close(self) -> None:
        for shard in self._shards:
            shard.close()


def stored_fingerprint(path: str | Path) -> str | None:
    """The ``mergeflow.fingerprint`` an output was written with (None if absent or unreadable).

    A directory output counts only when it opens as a complete checkpoint and all its shards carry
    the same fingerprint.
    """
    path = Path(path)
    try:
        is_dir = stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return None
    try:
        with ModelDirectoryReader.from_directory(path) if is_dir else SafetensorsReader(path) as reader:
            return reader.metadata.get("mergeflow.fingerprint")
    except CheckpointError:
        return None


def read_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint in memory (for small models, tests and evaluation)."""
    with open_checkpoint(path, trust_pickle) as reader:
        return {key: reader.load(key) for key in reader.keys()}
