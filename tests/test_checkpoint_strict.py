"""Malformed checkpoints are refused, never read as valid: the safetensors library is the oracle.

Every safetensors case is judged against ``safetensors`` itself: mergeflow either refuses the file with
a one-line CheckpointError or reads exactly what the library reads. The deliberate differences (mergeflow
is stricter) are recognised here independently of mergeflow's code: a key repeated in any JSON object
(the library keeps the last one), the sub-byte dtype F4, and serde artefacts (a tensor entry written as
an array, a dtype written as an object).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import stat
import struct
import tempfile
import threading
import tracemalloc
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergeflow.checkpoint import (
    SafetensorsReader,
    StateDictReader,
    load_pickled_state_dict,
    open_checkpoint,
    read_state_dict,
    sniff_format,
)
from mergeflow.errors import CheckpointError

# --- real files and their headers ---------------------------------------------------------------


def _base_tensors() -> list[tuple[dict[str, torch.Tensor], dict[str, str]]]:
    g = torch.Generator().manual_seed(0)
    mixed = {
        "w.f32": torch.randn(3, 4, generator=g),
        "w.bf16": torch.randn(2, 3, generator=g).to(torch.bfloat16),
        "w.f16": torch.randn(5, generator=g).to(torch.float16),
        "w.f64": torch.randn((), generator=g, dtype=torch.float64),
        "idx.i64": torch.arange(4, dtype=torch.int64),
        "idx.i32": torch.arange(4, dtype=torch.int32).reshape(2, 2),
        "bytes.u8": torch.arange(6, dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
    }
    small = {
        "a": torch.randn(2, generator=g),
        "b": torch.arange(-2, 2, dtype=torch.int8),
        "c": torch.randn(2, 2, generator=g).to(torch.float16),
    }
    return [(mixed, {"format": "pt", "note": "mixed"}), (small, {"k": "v"})]


@lru_cache(maxsize=1)
def _base_files() -> tuple[bytes, ...]:
    """The bytes of files written by ``safetensors.torch.save_file`` (several dtypes, with __metadata__)."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (tensors, metadata) in enumerate(_base_tensors()):
            path = Path(tmp) / f"base{i}.safetensors"
            save_file(tensors, str(path), metadata=metadata)
            out.append(path.read_bytes())
    return tuple(out)


class Obj(list):
    """A JSON object kept as its ``[key, value]`` pairs, so that a mutation can repeat a key."""


def _split(blob: bytes) -> tuple[list[list[Any]], bytes]:
    """A valid file as ``([[key, value], ...], data)``: entries as dicts, ``__metadata__`` as an Obj."""
    (n,) = struct.unpack("<Q", blob[:8])
    pairs = json.loads(blob[8 : 8 + n], object_pairs_hook=lambda p: [list(kv) for kv in p])
    out = []
    for key, value in pairs:
        out.append([key, Obj(value) if key == "__metadata__" else dict(value)])
    return out, blob[8 + n :]


def _dump(value: Any) -> str:
    if isinstance(value, Obj):
        return "{" + ",".join(json.dumps(k) + ":" + _dump(v) for k, v in value) + "}"
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(k) + ":" + _dump(v) for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dump(v) for v in value) + "]"
    return json.dumps(value)


def _join(pairs: list[list[Any]], data: bytes, pad: int = 0) -> bytes:
    """A file from header pairs and data bytes, the header followed by ``pad`` spaces."""
    header = (_dump(Obj(pairs)) + " " * pad).encode()
    return struct.pack("<Q", len(header)) + header + data


# --- the two readers ----------------------------------------------------------------------------


def _reference(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """What the safetensors library reads from ``path``, or None where it refuses (any exception)."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
    except Exception:
        return None
    return tensors, metadata


def _ours(path: Path) -> tuple[dict[str, torch.Tensor] | None, dict[str, str] | None, str | None]:
    """What mergeflow reads: ``(tensors, metadata, None)`` or ``(None, None, message)``; nothing else escapes."""
    try:
        with open_checkpoint(path) as reader:
            tensors = {}
            for key in reader.keys():
                tensor = reader.load(key)
                assert reader.meta(key).shape == tuple(tensor.shape) and reader.meta(key).dtype == tensor.dtype
                tensors[key] = tensor
            return tensors, reader.metadata, None
    except CheckpointError as exc:
        return None, None, str(exc)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN-proof, unlike ``torch.equal`` on floats)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _deliberate_difference(blob: bytes) -> str | None:
    """Why mergeflow may refuse a file the library reads (documented stricter rules), or None."""
    if len(blob) < 8:
        return None
    (n,) = struct.unpack("<Q", blob[:8])
    try:
        text = blob[8 : 8 + n].decode("utf-8")
    except UnicodeDecodeError:
        return None
    repeated: list[str] = []

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        repeated.extend(k for k in set(keys) if keys.count(k) > 1)
        return dict(pairs)

    try:
        header = json.loads(text, object_pairs_hook=hook)
    except (ValueError, RecursionError):
        return None
    if repeated:
        return f"repeated key {repeated[0]!r}"
    if not isinstance(header, dict):
        return None
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict):
            return "entry written as an array"
        if not isinstance(info.get("dtype"), str):
            return "dtype written as an object"
        if info["dtype"] == "F4":
            return "sub-byte dtype F4"
    return None


def _check_agreement(path: Path) -> str:
    """Assert mergeflow refuses or reads what safetensors reads; return the verdict for statistics."""
    blob = path.read_bytes()
    reference = _reference(path)
    tensors, metadata, message = _ours(path)
    if message is not None:
        assert "\n" not in message and message.startswith(f"{path}: not a valid safetensors file: "), message
        if reference is None:
            return "both refuse"
        reason = _deliberate_difference(blob)
        assert reason is not None, f"mergeflow refuses what safetensors reads: {message}"
        return f"deliberately refused ({reason.split(' ')[0]})"
    assert reference is not None, "mergeflow accepts a file the safetensors library refuses"
    assert _deliberate_difference(blob) is None, "mergeflow accepts what it documents it refuses"
    ref_tensors, ref_metadata = reference
    assert tensors is not None and set(tensors) == set(ref_tensors)
    assert metadata == ref_metadata
    for key, want in ref_tensors.items():
        assert _same_bits(tensors[key], want), key
    return "both read the same"


# --- mutations ----------------------------------------------------------------------------------

_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64", "C64"]
_DTYPES += ["F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F33", "f32", "", None, 3]
_INTS = st.one_of(
    st.integers(-3, 40),
    st.sampled_from([2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63)]),
)
_ODD_VALUES = st.sampled_from([3.0, "3", True, None, -0.0, [3], {"a": 1}, 1e300])


def _tensor_entries(pairs: list[list[Any]]) -> list[list[Any]]:
    return [p for p in pairs if p[0] != "__metadata__" and isinstance(p[1], dict)]


def _mutate_structure(data: st.DataObject, pairs: list[list[Any]], data_size: int) -> None:
    """One edit of the parsed header (offsets, keys, dtypes, shapes, metadata, order)."""
    entries = _tensor_entries(pairs)
    kind = data.draw(
        st.sampled_from(
            [
                "swap_offsets",
                "shift",
                "overlap",
                "set_offsets",
                "duplicate",
                "drop",
                "dtype",
                "shape",
                "metadata",
                "reorder",
                "extra_field",
                "not_an_object",
            ]
        ),
        label="structural edit",
    )
    event(kind)
    if kind == "reorder":
        pairs[:] = data.draw(st.permutations(pairs))
        return
    if kind == "metadata":
        choice = data.draw(st.sampled_from(["null", "empty", "int", "array", "repeat", "drop", "odd key"]))
        meta = next((p for p in pairs if p[0] == "__metadata__"), None)
        if meta is None:
            return
        if choice == "drop":
            pairs.remove(meta)
        else:
            meta[1] = {
                "null": None,
                "empty": Obj(),
                "int": Obj([["x", 1]]),
                "array": ["x"],
                "repeat": Obj([*meta[1], [meta[1][0][0], "again"]]),
                "odd key": Obj([*meta[1], ["dtype", "F32"]]),
            }[choice]
        return
    if not entries:
        return
    index = data.draw(st.integers(0, len(entries) - 1))
    key, info = entries[index]
    if kind == "swap_offsets" and len(entries) > 1:
        other = entries[data.draw(st.integers(0, len(entries) - 1))][1]
        info["data_offsets"], other["data_offsets"] = other["data_offsets"], info["data_offsets"]
    elif kind == "shift":
        which = data.draw(st.sampled_from([0, 1, 2]))
        delta = data.draw(st.integers(-9, 9))
        begin, end = info["data_offsets"]
        info["data_offsets"] = [begin + delta * (which != 1), end + delta * (which != 0)]
    elif kind == "overlap" and len(entries) > 1:
        other = entries[data.draw(st.integers(0, len(entries) - 1))][1]
        begin = other["data_offsets"][0] + data.draw(st.integers(0, 4))
        size = info["data_offsets"][1] - info["data_offsets"][0]
        info["data_offsets"] = [begin, begin + size]
    elif kind == "set_offsets":
        info["data_offsets"] = data.draw(st.lists(st.integers(0, data_size + 10), min_size=2, max_size=2))
    elif kind == "duplicate":
        copy = dict(info)
        if data.draw(st.booleans()):
            copy["data_offsets"] = data.draw(st.lists(st.integers(0, data_size), min_size=2, max_size=2))
        pairs.insert(data.draw(st.integers(0, len(pairs))), [key, copy])
    elif kind == "drop":
        pairs.remove(entries[index])
    elif kind == "dtype":
        info["dtype"] = data.draw(st.sampled_from(_DTYPES))
    elif kind == "shape":
        shape = list(info["shape"])
        numel = 1
        for s in shape:
            numel *= s
        how = data.draw(st.sampled_from(["flatten", "reverse", "append1", "append0", "set", "odd", "drop_dim"]))
        if how == "flatten":
            shape = [numel]
        elif how == "reverse":
            shape = shape[::-1]
        elif how == "append1":
            shape.append(1)
        elif how == "append0":
            shape.insert(data.draw(st.integers(0, len(shape))), 0)
        elif how == "drop_dim":
            shape = shape[:-1]
        elif shape:
            position = data.draw(st.integers(0, len(shape) - 1))
            shape[position] = data.draw(_INTS if how == "set" else _ODD_VALUES)
        else:
            shape = [data.draw(_INTS if how == "set" else _ODD_VALUES)]
        info["shape"] = shape
    elif kind == "extra_field":
        info[data.draw(st.sampled_from(["zz", "dtype_", "__metadata__"]))] = data.draw(_ODD_VALUES)
    elif kind == "not_an_object":
        # entries[index] is the pair inside ``pairs``: replace its value there
        entries[index][1] = data.draw(st.sampled_from([5, [info["dtype"], info["shape"], info["data_offsets"]]]))


_BYTE_EDITS = [
    "pad_spaces",
    "lead_whitespace",
    "trailing_junk",
    "corrupt_header",
    "insert_header",
    "header_len",
    "truncate",
    "extend",
    "corrupt_data",
]
_WHITESPACE = st.lists(st.sampled_from([b" ", b"\t", b"\n", b"\r"]), min_size=1, max_size=4).map(b"".join)


def _mutate_bytes(data: st.DataObject, blob: bytes) -> bytes:
    """One edit of the serialised file (header length, header bytes, whitespace, truncation, extension)."""
    n = struct.unpack("<Q", blob[:8])[0] if len(blob) >= 8 else len(blob) + 1
    if 8 + n > len(blob):  # an earlier edit broke the framing: only cut or extend the bytes
        kind = data.draw(st.sampled_from(["truncate", "extend"] if blob else ["extend"]), label="byte edit")
        event(kind)
        if kind == "truncate":
            return blob[: data.draw(st.integers(0, len(blob) - 1))]
        return blob + data.draw(st.binary(min_size=1, max_size=16))
    header, body = blob[8 : 8 + n], blob[8 + n :]
    kind = data.draw(st.sampled_from(_BYTE_EDITS), label="byte edit")
    event(kind)
    if kind == "pad_spaces":
        header += b" " * data.draw(st.integers(1, 9))
    elif kind == "lead_whitespace":
        header = (
            data.draw(st.binary(min_size=1, max_size=4).map(lambda b: bytes(b" \t\n\r"[x % 4] for x in b))) + header
        )
    elif kind == "trailing_junk":
        header += data.draw(st.sampled_from([b"\0", b"x", b"}", b"\xff", b" \0"]))
    elif kind == "corrupt_header" and header:
        position = data.draw(st.integers(0, len(header) - 1))
        header = header[:position] + bytes([data.draw(st.integers(0, 255))]) + header[position + 1 :]
    elif kind == "insert_header":
        position = data.draw(st.integers(0, len(header)))
        header = header[:position] + data.draw(st.binary(min_size=1, max_size=3)) + header[position:]
    elif kind == "header_len":
        declared = data.draw(
            st.one_of(
                st.integers(-5, 5).map(lambda d: max(0, n + d)),
                st.sampled_from([0, 1, len(blob) - 8, len(blob), 100_000_000, 100_000_001, 2**63, 2**64 - 1]),
            )
        )
        return struct.pack("<Q", declared) + header + body
    elif kind == "truncate":
        return blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "extend":
        return blob + data.draw(st.binary(min_size=1, max_size=16))
    elif kind == "corrupt_data" and body:
        position = data.draw(st.integers(0, len(body) - 1))
        body = body[:position] + bytes([data.draw(st.integers(0, 255))]) + body[position + 1 :]
    return struct.pack("<Q", len(header)) + header + body


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_mutated_real_headers_are_refused_or_read_as_safetensors_reads_them(data: st.DataObject) -> None:
    """Edits of real headers: mergeflow refuses (one line) or reads exactly what the library reads."""
    blob = data.draw(st.sampled_from(_base_files()), label="base file")
    pairs, body = _split(blob)
    for _ in range(data.draw(st.integers(0, 2), label="structural edits")):
        _mutate_structure(data, pairs, len(body))
    blob = _join(pairs, body, pad=data.draw(st.integers(0, 7)))
    for _ in range(data.draw(st.integers(0 if pairs else 1, 2), label="byte edits")):
        blob = _mutate_bytes(data, blob)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mutated.safetensors"
        path.write_bytes(blob)
        event(_check_agreement(path))


def test_the_mutations_exercise_every_outcome() -> None:
    """The property test is not vacuous: the same mutations yield all three verdicts."""
    verdicts: set[str] = set()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        for blob in _base_files():
            pairs, body = _split(blob)
            entries = _tensor_entries(pairs)
            rng.shuffle(pairs)  # order does not matter: both read it
            for variant in (
                _join(pairs, body, pad=5),
                _join(pairs, body)[:-1],
                _join([*pairs, [entries[0][0], entries[0][1]]], body),
            ):
                path.write_bytes(variant)
                verdicts.add(_check_agreement(path).split(" (")[0])
    assert verdicts == {"both read the same", "both refuse", "deliberately refused"}


# --- named malformed cases ----------------------------------------------------------------------


def _edit(edit: Callable[[list[list[Any]], bytes], bytes]) -> Callable[[], bytes]:
    def build() -> bytes:
        pairs, body = _split(_base_files()[1])  # a: F32 [2] @0..8, b: I8 [4], c: F16 [2, 2]
        return edit(pairs, body)

    return build


def _entry(pairs: list[list[Any]], key: str) -> dict[str, Any]:
    return next(v for k, v in pairs if k == key)


def _set(key: str, field: str, value: Any) -> Callable[[list[list[Any]], bytes], bytes]:
    def edit(pairs: list[list[Any]], body: bytes) -> bytes:
        _entry(pairs, key)[field] = value
        return _join(pairs, body)

    return edit


def _overlap(pairs: list[list[Any]], body: bytes) -> bytes:
    a, b = _entry(pairs, "a"), _entry(pairs, "b")
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + 4]
    return _join(pairs, body)


def _not_at_zero(pairs: list[list[Any]], body: bytes) -> bytes:
    for key, value in pairs:
        if key != "__metadata__":
            value["data_offsets"] = [x + 4 for x in value["data_offsets"]]
    return _join(pairs, b"\0" * 4 + body)


def _leading_whitespace() -> bytes:
    blob = _base_files()[0]
    (n,) = struct.unpack("<Q", blob[:8])
    header = b" \n\t" + blob[8 : 8 + n]
    return struct.pack("<Q", len(header)) + header + blob[8 + n :]


def _gap(pairs: list[list[Any]], body: bytes) -> bytes:
    last = max((v for k, v in pairs if k != "__metadata__"), key=lambda v: v["data_offsets"][0])
    last["data_offsets"] = [x + 4 for x in last["data_offsets"]]
    return _join(pairs, body + b"\0" * 4)


def _raw_header(text: bytes) -> Callable[[], bytes]:
    return lambda: struct.pack("<Q", len(text)) + text + b"\0" * 8


_F32x2 = b'"dtype":"F32","shape":[2],"data_offsets":[0,8]'

# name: (file bytes, safetensors refuses it?, what mergeflow's message says)
MALFORMED: dict[str, tuple[Callable[[], bytes], bool, str]] = {
    "overlapping offsets": (_edit(_overlap), True, r"overlap tensor"),
    "gap between tensors": (_edit(_gap), True, r"gap before its data"),
    "first tensor not at 0": (_edit(_not_at_zero), True, r"starts at byte 4, but data starts at byte 0"),
    "end before begin": (_edit(_set("a", "data_offsets", [8, 0])), True, r"end before they begin"),
    "dropped key": (_edit(lambda p, b: _join([x for x in p if x[0] != "b"], b)), True, r"gap|extra bytes"),
    "dtype of another size": (_edit(_set("a", "dtype", "F64")), True, r"hold 8 bytes, but shape \[2\] of F64 needs 16"),
    "unknown dtype": (_edit(_set("a", "dtype", "F33")), True, r"unknown dtype 'F33'"),
    "shape of another size": (_edit(_set("a", "shape", [3])), True, r"needs 12"),
    "negative dim": (_edit(_set("a", "shape", [-2])), True, r"non-negative 64-bit integers"),
    "float dim": (_edit(_set("a", "shape", [2.0])), True, r"non-negative 64-bit integers"),
    "minus-zero offset": (_raw_header(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[-0,8]}}'), True, r"non-neg"),
    "bool dim": (_edit(_set("a", "shape", [True, 2])), True, r"non-negative 64-bit integers"),
    "dim of 2**64": (_edit(_set("a", "shape", [2**64, 0])), True, r"non-negative 64-bit integers"),
    "overflowing shape": (_edit(_set("a", "shape", [2**62, 2**62, 0])), True, r"overflows 64 bits"),
    "dim torch cannot hold": (_edit(_set("a", "shape", [2**63, 0])), True, r"torch cannot hold"),
    "missing data_offsets": (_raw_header(b'{"a":{"dtype":"F32","shape":[2]}}'), True, r"no 'data_offsets'"),
    "three data_offsets": (_edit(_set("a", "data_offsets", [0, 8, 8])), True, r"pair of non-negative"),
    "non-string metadata": (_raw_header(b'{"__metadata__":{"x":1},"a":{%s}}' % _F32x2), True, r"__metadata__ must"),
    "metadata array": (_raw_header(b'{"__metadata__":[],"a":{%s}}' % _F32x2), True, r"__metadata__ must"),
    "entry not an object": (_raw_header(b'{"a":5}'), True, r"entry is a number"),
    "header an array": (_raw_header(b"[]"), True, r"header is an array"),
    "header not JSON": (_raw_header(b"{not json}"), True, r"not JSON"),
    "header not UTF-8": (_raw_header(b'{"\xff":{%s}}' % _F32x2), True, r"not valid UTF-8"),
    "NaN in header": (_raw_header(b'{"a":{%s,"z":NaN}}' % _F32x2), True, r"NaN is not a JSON value"),
    "number out of range": (_raw_header(b'{"a":{%s,"z":1e400}}' % _F32x2), True, r"number out of range"),
    "lone surrogate": (_raw_header(b'{"a\\ud800":{%s}}' % _F32x2), True, r"lone UTF-16 surrogate"),
    "nested too deep": (_raw_header(b'{"a":{%s,"z":%s}}' % (_F32x2, b"[" * 126 + b"]" * 126)), True, r"127 levels"),
    "NUL padding": (_raw_header(b'{"a":{%s}}\0' % _F32x2), True, r"not JSON"),
    "header length past the end": (lambda: struct.pack("<Q", 50) + b"{}", True, r"does not fit .*truncated"),
    "header length = file size": (lambda: struct.pack("<Q", 10) + b"{}", True, r"does not fit"),
    "header length over the limit": (lambda: struct.pack("<Q", 100_000_001) + b"{}", True, r"exceeds the format"),
    "empty file": (lambda: b"", True, r"0 bytes, shorter than the 8-byte header length"),
    "7-byte file": (lambda: b"\x02" + b"\0" * 6, True, r"shorter than the 8-byte"),
    "truncated data": (lambda: _base_files()[0][:-3], True, r"holds only .* \(truncated\)"),
    "trailing bytes": (lambda: _base_files()[0] + b"\0", True, r"extra bytes at the end"),
    # deliberate differences: the library reads these, mergeflow refuses them
    "repeated tensor key": (_raw_header(b'{"a":{%s},"a":{%s}}' % (_F32x2, _F32x2)), False, r"repeats key 'a'"),
    "repeated metadata key": (
        _raw_header(b'{"__metadata__":{"x":"1","x":"2"},"a":{%s}}' % _F32x2),
        False,
        r"repeats key 'x'",
    ),
    "entry as an array": (_raw_header(b'{"a":["F32",[2],[0,8]]}'), False, r"entry is an array"),
    "sub-byte dtype F4": (_raw_header(b'{"a":{"dtype":"F4","shape":[16],"data_offsets":[0,8]}}'), False, r"F4"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_safetensors_is_refused_in_one_line(tmp_path: Path, case: str) -> None:
    build, library_refuses, message = MALFORMED[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(build())
    assert (_reference(path) is None) == library_refuses, "the case does not test what it says"
    with pytest.raises(CheckpointError, match=message) as caught:
        read_state_dict(path)
    text = str(caught.value)
    assert text.startswith(f"{path}: not a valid safetensors file: ") and "\n" not in text
    if not library_refuses:
        assert _deliberate_difference(path.read_bytes()) is not None


# header edits both readers accept: mergeflow must read them exactly as the library does
ACCEPTED: dict[str, Callable[[], bytes]] = {
    "entries out of order": _edit(lambda p, b: _join(p[::-1], b)),
    "header padded with spaces": _edit(lambda p, b: _join(p, b, pad=13)),
    "leading whitespace": _leading_whitespace,
    "unknown field in an entry": _edit(_set("a", "zz", {"nested": [1, -0, 2.5]})),
    "metadata null": _raw_header(b'{"__metadata__":null,"a":{%s}}' % _F32x2),
    "dtype reinterpreted (F32 as I32)": _edit(_set("a", "dtype", "I32")),
    "reshaped": _edit(_set("c", "shape", [4, 1])),
    "unsigned dtypes": _raw_header(
        b'{"a":{"dtype":"U16","shape":[2],"data_offsets":[0,4]},"b":{"dtype":"U32","shape":[1],"data_offsets":[4,8]}}'
    ),
    "complex dtype": _raw_header(b'{"z":{"dtype":"C64","shape":[],"data_offsets":[0,8]}}'),
    "float8 dtypes": _raw_header(
        b'{"a":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]},'
        b'"b":{"dtype":"F8_E8M0","shape":[2,2],"data_offsets":[4,8]}}'
    ),
    "empty tensor with a huge dim": _raw_header(
        b'{"e":{"dtype":"F32","shape":[4611686018427387904,3,0],"data_offsets":[0,0]},"a":{%s}}' % _F32x2
    ),
    "no tensors at all": lambda: struct.pack("<Q", 2) + b"{}",
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_unusual_but_valid_headers_read_as_the_library_reads_them(tmp_path: Path, case: str) -> None:
    path = tmp_path / "ok.safetensors"
    path.write_bytes(ACCEPTED[case]())
    assert _reference(path) is not None, "the case does not test what it says"
    assert _check_agreement(path) == "both read the same"


def test_streaming_reads_only_the_tensors_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 GiB (sparse) tensor next to a small one: opening and loading the small one stays small."""
    import mmap

    big = 1 << 30
    header = json.dumps(
        {
            "small": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "big": {"dtype": "U8", "shape": [big], "data_offsets": [16, 16 + big]},
        }
    ).encode()
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header + struct.pack("<4f", 1, 2, 3, 4))
        handle.truncate(8 + len(header) + 16 + big)
    monkeypatch.setattr(mmap, "mmap", None)  # any use of mmap fails
    tracemalloc.start()
    try:
        with SafetensorsReader(path) as reader:
            assert reader.meta("big").shape == (big,)
            assert torch.equal(reader.load("small"), torch.tensor([1.0, 2.0, 3.0, 4.0]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak} bytes allocated to read 16 bytes"


# --- recognising the format from the content ----------------------------------------------------


def _tensors() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "i": torch.arange(3)}


def _assert_tensors(got: dict[str, torch.Tensor]) -> None:
    want = _tensors()
    assert set(got) == set(want) and all(_same_bits(got[k], want[k]) for k in want)


@pytest.mark.parametrize("name", ["model.pt", "model", "model.bin", "weights.npz"])
def test_safetensors_is_recognised_whatever_its_name(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    save_file(_tensors(), str(path), metadata={"k": "v"})
    assert sniff_format(path) == "safetensors"
    with open_checkpoint(path) as reader:
        assert isinstance(reader, SafetensorsReader) and reader.metadata == {"k": "v"}
        _assert_tensors({k: reader.load(k) for k in reader.keys()})


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_torch_pickle_named_safetensors_loads_as_a_pickle(
    tmp_path: Path, zipped: bool, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "model.safetensors"
    torch.save(_tensors(), path, _use_new_zipfile_serialization=zipped)
    assert path.read_bytes()[:4] == b"PK\x03\x04" if zipped else path.read_bytes()[:1] == b"\x80"
    assert sniff_format(path) == "pickle"
    with caplog.at_level("WARNING", logger="mergeflow.checkpoint"), open_checkpoint(path) as reader:
        assert isinstance(reader, StateDictReader)
        _assert_tensors({k: reader.load(k) for k in reader.keys()})
    assert "holds a torch pickle" in caplog.text


class _Payload:
    def __reduce__(self):  # runs a shell command on unpickling
        return (os.system, ("touch PWNED_BY_STRICT_TEST",))


@pytest.mark.parametrize("name", ["evil.pt", "evil.safetensors", "evil"])
def test_pickle_that_would_run_code_is_refused_whatever_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / name
    torch.save({"w": torch.zeros(2), "x": _Payload()}, path)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle.*--trust-pickle") as caught:
        open_checkpoint(path)
    assert "\n" not in str(caught.value) and "convert it to safetensors" in str(caught.value)
    assert not (tmp_path / "PWNED_BY_STRICT_TEST").exists()


NOT_CHECKPOINTS: dict[str, tuple[bytes, str]] = {
    "random bytes": (bytes(random.Random(1).randrange(256) for _ in range(300)), r"bytes starting with"),
    "text": (b"hello, I am not a model\n", r"bytes starting with b'hello, I"),
    "empty": (b"", r"the file is empty"),
    "plain Python pickle": (pickle.dumps({"w": [1.0, 2.0]}), r"a Python pickle that torch.save did not write"),
    "pickle opcode then junk": (b"\x80\x04garbage that is no pickle", r"a Python pickle"),
    "numpy .npy": (b"\x93NUMPY\x01\x00v\x00{'descr': '<f4'}", r"bytes starting with"),
}


@pytest.mark.parametrize("case", list(NOT_CHECKPOINTS))
def test_bytes_that_are_no_checkpoint_are_named_so(tmp_path: Path, case: str) -> None:
    content, detail = NOT_CHECKPOINTS[case]
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    assert sniff_format(path) == "unknown"
    for call in (open_checkpoint, load_pickled_state_dict):
        with pytest.raises(CheckpointError, match=detail) as caught:
            call(path)
        text = str(caught.value)
        assert text.startswith(f"{path}: not a checkpoint: neither safetensors nor a torch pickle") and "\n" not in text
        assert caught.value.__cause__ is None, "a torch error leaked through"


def test_corrupt_zip_pickle_is_reported_as_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    buffer = io.BytesIO()
    torch.save(_tensors(), buffer)
    path.write_bytes(buffer.getvalue()[:300])
    with pytest.raises(CheckpointError, match=r"broken\.safetensors: corrupt or truncated checkpoint") as caught:
        open_checkpoint(path)
    assert "\n" not in str(caught.value)


def test_safetensors_handed_to_the_pickle_loader_is_named(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    save_file(_tensors(), str(path))
    with pytest.raises(CheckpointError, match=r"is a safetensors file, not a torch pickle"):
        load_pickled_state_dict(path)


def test_missing_file(tmp_path: Path) -> None:
    for call in (open_checkpoint, SafetensorsReader, load_pickled_state_dict, sniff_format):
        with pytest.raises(CheckpointError, match=r"missing\.pt: no such file$"):
            call(tmp_path / "missing.pt")


def test_directory_is_not_a_regular_file(tmp_path: Path) -> None:
    folder = tmp_path / "model.safetensors"
    folder.mkdir()
    for call in (SafetensorsReader, load_pickled_state_dict, sniff_format):
        with pytest.raises(CheckpointError, match=r"not a regular file \(a directory\)$"):
            call(folder)
    # open_checkpoint reads a directory as a model directory: one without weights is named so
    with pytest.raises(CheckpointError, match=r"model\.safetensors: a directory without a checkpoint \(none of"):
        open_checkpoint(folder)


def test_character_device_is_not_a_regular_file() -> None:
    if not os.path.exists(os.devnull) or not stat.S_ISCHR(os.stat(os.devnull).st_mode):
        pytest.skip(f"{os.devnull} is not a character device here")
    with pytest.raises(CheckpointError, match=r"not a regular file \(a character device\)$"):
        open_checkpoint(os.devnull)


def _without_hanging(call: Callable[[], object], fifo: Path) -> BaseException | None:
    """Run ``call``; if it blocks opening ``fifo`` for reading, unblock it by opening the other end, then fail."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # succeeds because a reader is waiting
        os.close(fd)
        thread.join(10)
        pytest.fail(f"{call} opened the FIFO for reading and blocked")
    return outcome[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_is_refused_without_opening_it(tmp_path: Path) -> None:
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    for call in (open_checkpoint, SafetensorsReader, load_pickled_state_dict, sniff_format, read_state_dict):
        error = _without_hanging(lambda call=call: call(fifo), fifo)
        assert isinstance(error, CheckpointError) and str(error) == f"{fifo}: not a regular file (a FIFO)"


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: permission bits do not stop root from reading, so there is nothing to refuse")
    path = tmp_path / "locked.safetensors"
    save_file(_tensors(), str(path))
    path.chmod(0)
    try:
        for call in (open_checkpoint, load_pickled_state_dict):
            with pytest.raises(CheckpointError, match=r"locked\.safetensors: not readable \(permission denied\)$"):
                call(path)
    finally:
        path.chmod(0o644)
