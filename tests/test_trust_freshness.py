"""Never serve a stale result or record a wrong hash: in-place edits the stat cache cannot see,
inputs that change during a merge, results of older code, DVC deps, and grid points of bf16/fp16
checkpoints that must be the direct merge."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import LAYOUTS, random_state_dicts, write_set

import mergeflow.codeid as codeid
import mergeflow.engine as engine
from mergeflow.checkpoint import SafetensorsReader, read_state_dict
from mergeflow.engine import merge_checkpoints
from mergeflow.errors import CheckpointError
from mergeflow.grid import build_grid_basis, point_states
from mergeflow.hashing import cached_sha256, sha256_file_cached

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clock_ahead(monkeypatch) -> None:
    """Let the hash cache remember files written a moment ago (its racy rule looks at the ctime)."""
    import time

    import mergeflow.hashing as hashing

    monkeypatch.setattr(hashing, "_now_ns", lambda: time.time_ns() + 60 * 10**9)


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, list[Path]]:
    base, tuned = random_state_dicts(LAYOUTS["open_clip"](), tasks=3, seed=7, dtype=torch.float32)
    return write_set(tmp_path / "in", base, tuned)


def _recorded(path: Path) -> dict:
    with SafetensorsReader(path) as reader:
        return json.loads(reader.metadata["mergeflow.inputs"])


def _edit_in_place_keep_mtime(path: Path) -> None:
    """Change bytes of a tensor without changing size, inode or mtime (what `touch -r` restores)."""
    before = os.stat(path)
    with SafetensorsReader(path) as reader:
        header_end = reader._data_start
    with open(path, "r+b") as handle:
        handle.seek(header_end)
        first = handle.read(4)
        handle.seek(header_end)
        handle.write(bytes(b ^ 0x55 for b in first))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (before.st_size, before.st_ino, before.st_mtime_ns)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_in_place_edit_with_restored_mtime_is_merged_again(inputs, tmp_path: Path, clock_ahead) -> None:
    base, tuned = inputs
    out = tmp_path / "m.safetensors"
    first = merge_checkpoints("task_arithmetic", base, tuned, out, device="cpu")
    assert not first.skipped and cached_sha256(tuned[1]) == _sha(tuned[1])
    assert merge_checkpoints("task_arithmetic", base, tuned, out, device="cpu").skipped
    _edit_in_place_keep_mtime(tuned[1])
    again = merge_checkpoints("task_arithmetic", base, tuned, out, device="cpu")
    assert not again.skipped, "served a merge of other bytes as up to date"
    assert [f["sha256"] for f in _recorded(out)["finetuned"]] == [_sha(p) for p in tuned]


def test_force_records_the_hash_of_the_bytes_read_even_if_the_cache_lies(inputs, tmp_path: Path) -> None:
    base, tuned = inputs
    out = tmp_path / "m.safetensors"
    cache = Path(os.environ["MERGEFLOW_CACHE_DIR"]) / "sha256.json"
    entries = json.loads(cache.read_text()) if cache.exists() else {}
    st = os.stat(tuned[0])  # a poisoned entry that matches the file's current stat exactly
    entries[os.path.realpath(tuned[0])] = {
        "stat": [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns],
        "sha256": "0" * 64,
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(entries))
    assert sha256_file_cached(tuned[0]) == "0" * 64  # the cache would say so...
    merge_checkpoints("weight_average", base, tuned, out, device="cpu", force=True)
    assert _recorded(out)["finetuned"][0]["sha256"] == _sha(tuned[0])  # ...but --force reads the bytes


def test_an_input_changed_during_the_merge_stops_it(inputs, tmp_path: Path, monkeypatch) -> None:
    base, tuned = inputs
    out = tmp_path / "m.safetensors"
    original = engine.load_checked
    edited = []

    def load_then_edit(reader, key):
        tensor = original(reader, key)
        if not edited:
            edited.append(key)
            _edit_in_place_keep_mtime(tuned[2])
        return tensor

    monkeypatch.setattr(engine, "load_checked", load_then_edit)
    with pytest.raises(CheckpointError, match=r"ft2\.safetensors: changed while being merged"):
        merge_checkpoints("weight_average", base, tuned, out, device="cpu")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_a_merge_by_other_code_is_not_up_to_date(inputs, tmp_path: Path, monkeypatch) -> None:
    base, tuned = inputs
    out = tmp_path / "m.safetensors"
    merge_checkpoints("cart", base, tuned, out, device="cpu")
    assert merge_checkpoints("cart", base, tuned, out, device="cpu").skipped
    with SafetensorsReader(out) as reader:
        assert reader.metadata["mergeflow.code"] == codeid.code_identity("mergeflow.engine")
    monkeypatch.setattr(engine, "code_identity", lambda *modules: "edited-linalg")
    assert not merge_checkpoints("cart", base, tuned, out, device="cpu").skipped


@pytest.fixture
def package_copy(tmp_path: Path, monkeypatch) -> Path:
    """A copy of the project's packages that a test may edit; code identities are computed from it."""
    root = tmp_path / "checkout"
    for package in codeid.PROJECT_PACKAGES:
        shutil.copytree(PROJECT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(codeid, "ROOT", root)
    codeid._closure.cache_clear()
    codeid._identity.cache_clear()
    yield root
    codeid._closure.cache_clear()
    codeid._identity.cache_clear()


def _fresh_identity(*modules: str) -> str:
    codeid._closure.cache_clear()
    codeid._identity.cache_clear()
    return codeid.code_identity(*modules)


def test_code_identity_follows_imports_and_only_imports(package_copy: Path) -> None:
    files = {p.relative_to(package_copy).as_posix() for p in codeid.code_files("mergeflow.engine")}
    assert {"mergeflow/linalg.py", "mergeflow/methods/cart.py", "mergeflow/writer.py", "mergeflow/__init__.py"} <= files
    assert "mergeflow/zoo/report.py" not in files and "mergeflow/tracking.py" not in files
    # function-level and relative imports count too
    (package_copy / "mergeflow" / "zz_probe.py").write_text("def f():\n    from . import grid\n")
    probe = {p.relative_to(package_copy).as_posix() for p in codeid.code_files("mergeflow.zz_probe")}
    assert {"mergeflow/grid.py", "mergeflow/engine.py", "mergeflow/linalg.py"} <= probe
    engine_id, report_id = _fresh_identity("mergeflow.engine"), _fresh_identity("mergeflow.zoo.selection")
    with open(package_copy / "mergeflow" / "linalg.py", "a") as handle:
        handle.write("\n# an edit\n")
    assert _fresh_identity("mergeflow.engine") != engine_id
    assert _fresh_identity("mergeflow.zoo.selection") != report_id
    engine_id = _fresh_identity("mergeflow.engine")
    with open(package_copy / "mergeflow" / "tracking.py", "a") as handle:
        handle.write("\n# unrelated to merging\n")
    assert _fresh_identity("mergeflow.engine") == engine_id
    init = package_copy / "mergeflow" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "9'))  # an upgrade
    assert _fresh_identity("mergeflow.engine") != engine_id


def test_pipeline_and_analysis_keys_use_the_code_identity(monkeypatch) -> None:
    from tasks import pipeline_tasks

    calls = []
    monkeypatch.setattr(pipeline_tasks, "code_identity", lambda module: calls.append(module) or module)
    assert pipeline_tasks.code_of(pipeline_tasks.select_method) == "mergeflow.zoo.selection"
    assert pipeline_tasks.code_of(pipeline_tasks.adapt_zoo) == "mergeflow.zoo.adapt"
    assert calls == ["mergeflow.zoo.selection", "mergeflow.zoo.adapt"]
    text = (PROJECT / "tasks" / "pipeline_tasks.py").read_text() + (PROJECT / "flows" / "analyses.py").read_text()
    assert "code_version" not in text  # no hand-kept module lists left


def test_dvc_stage_deps_are_the_code_identity_files() -> None:
    text = (PROJECT / "dvc.yaml").read_text()
    assert codeid.sync_dvc_deps(text) == text, "dvc.yaml code deps are stale: run python -m mergeflow.codeid dvc.yaml"
    assert "# code: flows.pipeline" in text  # the run stage's deps: the whole flow's code identity
    assert {"      - mergeflow/linalg.py", "      - tasks/pipeline_tasks.py", "      - flows/pipeline.py"} <= set(
        text.splitlines()
    )
    stale = text.replace("      - mergeflow/linalg.py\n", "", 1)
    assert codeid.sync_dvc_deps(stale) == text


# -- bf16 / fp16: grid points are the direct merge ------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("method", "params", "scalings"),
    [("task_arithmetic", {}, [0.3, 0.7, 1.3]), ("cart", {"rank_ratio": 0.25}, [1.0, 2.5]),
     ("ties", {"density": 0.3}, [0.6, 1.4]), ("tsv", {}, [0.5, 1.5])],
)  # fmt: skip
def test_half_precision_grid_points_equal_direct_merges(
    tmp_path: Path, dtype: torch.dtype, method: str, params: dict, scalings: list[float]
) -> None:
    base, tuned = random_state_dicts(LAYOUTS["open_clip_wide"](), tasks=3, seed=11, dtype=dtype, scale=0.02)
    theta0, models = write_set(tmp_path / "in", base, tuned)
    points = [{**params, "scaling": s} for s in scalings]
    basis = build_grid_basis(method, theta0, models, points, tmp_path / "basis", device="cpu")
    for scaling in scalings:
        (state,) = point_states(basis, 0, scaling)
        direct = tmp_path / f"direct-{scaling}.safetensors"
        merge_checkpoints(method, theta0, models, direct, {**params, "scaling": scaling}, device="cpu")
        want = read_state_dict(direct)
        assert set(state) == set(want)
        changed = total = 0
        for key, w in want.items():
            got = state[key]
            assert got.dtype == w.dtype == base[key].dtype, key
            if not w.is_floating_point():
                assert torch.equal(got, w)
                continue
            # equal to float32 round-off before the final cast: at most one ulp of the half dtype
            # apart, and only where the float32 values straddle a rounding boundary
            ulp = torch.finfo(dtype).eps * w.float().abs().clamp(min=torch.finfo(dtype).tiny)
            diff = (got.float() - w.float()).abs()
            assert bool((diff <= ulp * 1.01).all()), (key, float((diff / ulp).max()))
            changed += int((got != w).sum())
            total += w.numel()
        assert changed <= max(2, total // 1000), (changed, total)
