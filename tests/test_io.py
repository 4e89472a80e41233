"""Checkpoint reading and writing: interop with the safetensors library, atomicity, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import LAYOUTS, load, random_state_dicts, write_set
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergeflow.checkpoint import TensorMeta, open_checkpoint, read_state_dict
from mergeflow.engine import merge_checkpoints
from mergeflow.errors import CheckpointError, ConfigError, IncompatibleCheckpointsError
from mergeflow.writer import SafetensorsWriter, save_state_dict

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
]


def _mixed() -> dict[str, torch.Tensor]:
    out = {}
    for i, dtype in enumerate(DTYPES):
        if dtype.is_floating_point:
            out[f"t{i}"] = torch.randn(3, i + 1).to(dtype)
        elif dtype == torch.bool:
            out[f"t{i}"] = torch.rand(5) > 0.5
        else:
            out[f"t{i}"] = torch.arange(7, dtype=dtype)
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.zeros(0, 4)
    return out


def test_reads_what_safetensors_writes(tmp_path: Path) -> None:
    tensors = _mixed()
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"a": "b"})
    with open_checkpoint(tmp_path / "x.safetensors") as reader:
        assert reader.metadata == {"a": "b"}
        assert set(reader.keys()) == set(tensors)
        for key, tensor in tensors.items():
            assert reader.meta(key) == TensorMeta(tuple(tensor.shape), tensor.dtype)
            assert torch.equal(reader.load(key), tensor)


def test_safetensors_reads_what_we_write(tmp_path: Path) -> None:
    tensors = _mixed()
    path = save_state_dict(tmp_path / "y.safetensors", tensors, {"k": "v"})
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"k": "v"}
    assert not list(tmp_path.glob(".*partial*"))


def test_writer_abort_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "z.safetensors"
    with pytest.raises(RuntimeError), SafetensorsWriter(target, {"a": TensorMeta((2,), torch.float32)}) as writer:
        writer.write("a", torch.ones(2))
        raise RuntimeError("killed")
    assert not target.exists() and not list(tmp_path.iterdir())


def test_writer_refuses_incomplete_commit_and_wrong_shapes(tmp_path: Path) -> None:
    layout = {"a": TensorMeta((2,), torch.float32), "b": TensorMeta((3,), torch.float32)}
    writer = SafetensorsWriter(tmp_path / "w.safetensors", layout)
    with pytest.raises(ValueError, match="planned"):
        writer.write("a", torch.ones(3))
    writer.write("a", torch.ones(2))
    with pytest.raises(CheckpointError, match="never written"):
        writer.commit()
    assert not list(tmp_path.iterdir())


def test_killed_process_leaves_no_target(tmp_path: Path) -> None:
    """A process killed mid-write leaves only a hidden .partial file, never the target."""
    target = tmp_path / "big.safetensors"
    code = f"""
import os, torch
from mergeflow.checkpoint import TensorMeta
from mergeflow.writer import SafetensorsWriter
w = SafetensorsWriter({str(target)!r}, {{"a": TensorMeta((4,), torch.float32), "b": TensorMeta((4,), torch.float32)}})
w.write("a", torch.ones(4))
os._exit(9)
"""
    proc = subprocess.run([sys.executable, "-c", code], check=False)
    assert proc.returncode == 9
    assert not target.exists()
    assert [p.name.startswith(".big.safetensors.partial-") for p in tmp_path.iterdir()] == [True]


@pytest.fixture
def good_set(tmp_path: Path):
    base, tuned = random_state_dicts(LAYOUTS["hf_bert"](), tasks=2, seed=0, dtype=torch.float32)
    base_path, paths = write_set(tmp_path / "in", base, tuned)
    return tmp_path, base, tuned, base_path, paths


def _expect_failure(tmp_path: Path, base_path: Path, paths: list[Path], error: type, match: str, **kw) -> None:
    out = tmp_path / "out" / "merged.safetensors"
    with pytest.raises(error, match=match):
        merge_checkpoints("cart", base_path, paths, out, **kw)
    assert not out.exists()
    assert not (out.parent.exists() and list(out.parent.iterdir())), "partial output left behind"


def test_truncated_safetensors(good_set) -> None:
    tmp, _, _, base_path, paths = good_set
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 100])
    _expect_failure(tmp, base_path, paths, CheckpointError, r"ft1\.safetensors.*truncated")


def test_garbage_header(good_set) -> None:
    tmp, _, _, base_path, paths = good_set
    paths[0].write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 10)
    _expect_failure(tmp, base_path, paths, CheckpointError, r"ft0\.safetensors.*not JSON")


def test_empty_file(good_set) -> None:
    tmp, _, _, base_path, paths = good_set
    paths[0].write_bytes(b"")
    _expect_failure(tmp, base_path, paths, CheckpointError, r"ft0\.safetensors.*shorter than")


def _drop_and_add(sd: dict) -> None:
    sd.pop("pooler.dense.bias")
    sd["extra.weight"] = torch.zeros(2)


def _poison_last_key(value: float) -> Callable[[dict], None]:
    def mutate(sd: dict) -> None:
        # the last key in sorted order: the merge has already written every other key when it fails
        key = sorted(sd)[-1]
        sd[key] = sd[key].clone()
        sd[key].view(-1)[0] = value

    return mutate


BAD_FINE_TUNES = {
    "keys": (_drop_and_add, IncompatibleCheckpointsError,
             r"ft1\.safetensors: key sets differ: missing 1 key.*pooler\.dense\.bias.*extra\.weight"),
    "shape": (lambda sd: sd.update({"pooler.dense.weight": torch.zeros(16, 15)}), IncompatibleCheckpointsError,
              r"ft1\.safetensors: key 'pooler\.dense\.weight' has shape \[16, 15\]"),
    "dtype": (lambda sd: sd.update({"pooler.dense.weight": sd["pooler.dense.weight"].half()}),
              IncompatibleCheckpointsError, r"ft1\.safetensors: key 'pooler\.dense\.weight' has dtype torch\.float16"),
    "nan": (_poison_last_key(float("nan")), CheckpointError,
            r"ft1\.safetensors: key 'pooler\.dense\.weight' holds 1 NaN/Inf"),
    "inf": (_poison_last_key(float("inf")), CheckpointError,
            r"ft1\.safetensors: key 'pooler\.dense\.weight' holds 1 NaN/Inf"),
    "non-float": (lambda sd: sd.update({"embeddings.position_ids": sd["embeddings.position_ids"] + 1}),
                  IncompatibleCheckpointsError, r"ft1\.safetensors: non-float key 'embeddings\.position_ids' differs"),
}  # fmt: skip


@pytest.mark.parametrize("problem", list(BAD_FINE_TUNES))
def test_bad_fine_tune_is_refused_and_nothing_is_written(good_set, problem: str) -> None:
    tmp, _, tuned, base_path, paths = good_set
    mutate, error, match = BAD_FINE_TUNES[problem]
    sd = dict(tuned[1])
    mutate(sd)
    save_file(sd, str(paths[1]))
    _expect_failure(tmp, base_path, paths, error, match)


def test_non_float_tensors_copied_from_pretrained(good_set) -> None:
    tmp, base, _, base_path, paths = good_set
    out = tmp / "ok.safetensors"
    merge_checkpoints("ties", base_path, paths, out)
    merged = load(out)
    assert merged["embeddings.position_ids"].dtype == torch.int64
    assert torch.equal(merged["embeddings.position_ids"], base["embeddings.position_ids"])
    assert {k: (v.shape, v.dtype) for k, v in merged.items()} == {k: (v.shape, v.dtype) for k, v in base.items()}


class Payload:
    def __reduce__(self):  # runs os.system on unpickling
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_pickle_that_runs_code_is_refused(good_set, monkeypatch) -> None:
    tmp, base, _, base_path, paths = good_set
    monkeypatch.chdir(tmp)
    evil = tmp / "in" / "evil.pt"
    torch.save({**base, "x": Payload()}, evil)
    _expect_failure(tmp, base_path, [evil, paths[1]], CheckpointError, r"evil\.pt: refusing to unpickle")
    assert not (tmp / "PWNED_BY_PICKLE").exists()


def test_plain_state_dict_pickles_load_safely(good_set) -> None:
    tmp, _, tuned, base_path, paths = good_set
    pt = tmp / "in" / "ft0.pt"
    torch.save({"state_dict": tuned[0]}, pt)
    a, b = tmp / "a.safetensors", tmp / "b.safetensors"
    merge_checkpoints("task_arithmetic", base_path, [pt, paths[1]], a)
    merge_checkpoints("task_arithmetic", base_path, paths, b)
    assert all(torch.equal(x, y) for x, y in zip(load(a).values(), load(b).values(), strict=True))


def test_pickled_module_needs_explicit_trust(tmp_path: Path) -> None:
    module = torch.nn.Linear(3, 2)
    path = tmp_path / "module.pt"
    torch.save(module, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        read_state_dict(path)
    loaded = read_state_dict(path, trust_pickle=True)
    assert torch.equal(loaded["weight"], module.weight.detach())


def test_corrupt_pickle(tmp_path: Path) -> None:
    path = tmp_path / "broken.pt"
    torch.save({"w": torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"broken\.pt: corrupt or truncated"):
        read_state_dict(path)


def test_unknown_suffix_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        open_checkpoint(tmp_path / "w.npz")
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "missing.safetensors")


def test_bad_parameters_are_reported_before_work(good_set) -> None:
    tmp, _, _, base_path, paths = good_set
    with pytest.raises(ConfigError, match="rank_ratio"):
        merge_checkpoints("cart", base_path, paths, tmp / "o.safetensors", {"rank_ratio": 1.5})
    with pytest.raises(ConfigError, match="unknown merge method 'nope'"):
        merge_checkpoints("nope", base_path, paths, tmp / "o.safetensors")
    with pytest.raises(ConfigError, match="mask_lambda has 3 values for 2 tasks"):
        merge_checkpoints("consensus", base_path, paths, tmp / "o.safetensors", {"mask_lambda": (0.1, 0.2, 0.3)})
    with pytest.raises(
        ConfigError,
        match=r"rnak_ratio: unknown parameter \(known: selector, exclude, include, svd_solver, scaling, rank_ratio\)",
    ):
        merge_checkpoints("cart", base_path, paths, tmp / "o.safetensors", {"rnak_ratio": 0.1})
    assert not (tmp / "o.safetensors").exists()


def test_metadata_records_provenance_and_rerun_resumes(good_set) -> None:
    tmp, _, _, base_path, paths = good_set
    out = tmp / "m.safetensors"
    first = merge_checkpoints("cart", base_path, paths, out, {"rank_ratio": 0.25})
    with open_checkpoint(out) as reader:
        meta = reader.metadata
    inputs = json.loads(meta["mergeflow.inputs"])
    assert inputs == first.inputs
    assert inputs["pretrained"]["sha256"] == hashlib.sha256(base_path.read_bytes()).hexdigest()
    assert [f["sha256"] for f in inputs["finetuned"]] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert meta["mergeflow.fingerprint"] != "0" * 64
    assert [f["file"] for f in inputs["finetuned"]] == ["ft0.safetensors", "ft1.safetensors"]
    assert json.loads(meta["mergeflow.params"])["rank_ratio"] == 0.25
    selection = json.loads(meta["mergeflow.selection"])
    assert selection["layout"] == "hf_bert" and len(selection["keys"]) == 12  # 6 matrices x 2 layers
    assert meta["mergeflow.method"] == "cart" and meta["mergeflow.version"]
    stamp = out.stat().st_mtime_ns
    again = merge_checkpoints("cart", base_path, paths, out, {"rank_ratio": 0.25})
    assert again.skipped and out.stat().st_mtime_ns == stamp
    changed = merge_checkpoints("cart", base_path, paths, out, {"rank_ratio": 0.5})
    assert not changed.skipped and out.stat().st_mtime_ns != stamp


def test_large_finite_values_are_not_mistaken_for_overflow(tmp_path: Path) -> None:
    """Sums that overflow float32 must not be reported as NaN/Inf (the fast check falls back)."""
    big = torch.full((8,), 3.0e38)
    base, tuned = {"w": big}, [{"w": big * 0.9}, {"w": big * 0.8}]
    base_path, paths = write_set(tmp_path / "in", base, tuned)
    merge_checkpoints("weight_average", base_path, paths, tmp_path / "o.safetensors", precision="float64")
    torch.testing.assert_close(load(tmp_path / "o.safetensors")["w"], big * 0.85)
