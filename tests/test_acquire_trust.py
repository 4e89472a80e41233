"""Trust what acquisition writes: legacy pickles from old torch, wrong pins, names that leave --from-dir."""

from __future__ import annotations

import copyreg
import functools
import hashlib
import http.server
import io
import json
import os
import pickle
import pickletools
import shlex
import shutil
import sys
import threading
import types
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save as save_bytes

from mergeflow.checkpoint import read_state_dict
from mergeflow.config import load_config
from mergeflow.download import HashMismatchError
from mergeflow.errors import CheckpointError, ConfigError, MergeflowError
from mergeflow.legacy import _PickleModule, convert_legacy_checkpoint, load_legacy_state_dict
from mergeflow.sources import HubSource, PathSource, UrlSource
from mergeflow.store import ArtifactStore

# --- legacy pickles written by torch < 2.0 -----------------------------------------------------

# what nn.Module.__init__ set in torch 1.5; everything a fresh module has beyond these is newer
OLD_MODULE_ATTRS = {
    "training", "_parameters", "_buffers", "_backward_hooks", "_forward_hooks", "_forward_pre_hooks",
    "_state_dict_hooks", "_load_state_dict_pre_hooks", "_modules",
}  # fmt: skip
NEWER_MODULE_ATTRS = set(torch.nn.Module().__dict__) - OLD_MODULE_ATTRS


class _OldTorchPickler(pickle.Pickler):
    """Pickles every module with the ``__dict__`` layout of torch 1.5: the newer attributes are left out."""

    def reducer_override(self, obj: Any) -> Any:
        """Reduce modules like ``object.__reduce_ex__(2)`` does, minus the attributes old torch did not set."""
        if isinstance(obj, torch.nn.Module):
            state = {k: v for k, v in obj.__dict__.items() if k not in NEWER_MODULE_ATTRS}
            return copyreg.__newobj__, (type(obj),), state
        return NotImplemented


class _OldTorchPickle:
    """A ``pickle_module`` for ``torch.save`` that writes old-torch module states."""

    Pickler = _OldTorchPickler
    Unpickler = pickle.Unpickler
    dump = staticmethod(pickle.dump)
    load = staticmethod(pickle.load)


def _save_old_style(obj: Any, path: Path, zip_format: bool) -> Path:
    """``torch.save`` as old torch wrote it: old module states, in the zip or the legacy (tar-less) format."""
    with warnings.catch_warnings():  # the legacy format looks for the classes' source code
        warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
        torch.save(obj, path, pickle_module=_OldTorchPickle, _use_new_zipfile_serialization=zip_format)
    return path


def _pickled_strings(path: Path) -> set[str]:
    """Every string and global name in the pickles of a torch file (``data.pkl``, or the legacy format's five)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            data, count = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl"))), 1
    else:
        data, count = path.read_bytes(), 5  # magic, protocol, sys info, the object, storage keys; then raw bytes
    found: set[str] = set()
    stream = io.BytesIO(data)
    for _ in range(count):
        for opcode, arg, _pos in pickletools.genops(stream):
            if isinstance(arg, str):
                found.update(arg.split(" ") if opcode.name == "GLOBAL" else [arg])
    return found


def _convert_to_rgb(image: Any) -> Any:
    """Stands in for ``open_clip.transform._convert_to_rgb``, which pickled preprocessors reference."""
    return image


class _Preprocess:
    """A plain (non-module) object in the encoder's ``__dict__``, as torchvision transforms are."""

    def __init__(self) -> None:
        self.size = 32
        self.fn = _convert_to_rgb


class _Head(torch.nn.Module):
    """Nested modules, a parameter and a (persistent) buffer of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.randn(16))
        self.register_buffer("mask", torch.arange(16) % 3 == 0)
        self.blocks = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.GELU(), torch.nn.BatchNorm1d(8))


class ImageEncoder(torch.nn.Module):
    """Shaped like the task-vectors release's ``src.modeling.ImageEncoder``: an open_clip model inside."""

    def __init__(self) -> None:
        super().__init__()
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        cfg = CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32)
        self.model = _build_vision_tower(16, cfg, quick_gelu=True)
        self.head = _Head()
        self.train_preprocess = _Preprocess()
        self.cache_dir = None


@pytest.fixture
def src_modeling(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A throwaway ``src.modeling`` package holding the fixture classes, so pickles name them as the release did."""
    src, modeling = types.ModuleType("src"), types.ModuleType("src.modeling")
    src.modeling = modeling
    for obj in (ImageEncoder, _Head, _Preprocess, _convert_to_rgb):
        monkeypatch.setattr(obj, "__module__", "src.modeling")
        setattr(modeling, obj.__name__, obj)
    monkeypatch.setitem(sys.modules, "src", src)
    monkeypatch.setitem(sys.modules, "src.modeling", modeling)
    return modeling


def _old_encoder(src_modeling: types.ModuleType) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    encoder = src_modeling.ImageEncoder()
    encoder.head.blocks[2].running_mean.uniform_()  # buffers that differ from their initial values
    encoder.head.blocks[2].num_batches_tracked += 7
    return encoder, {k: v.detach().clone() for k, v in encoder.state_dict().items()}


def _assert_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-format"])
def test_old_torch_module_pickle_converts_exactly(src_modeling, tmp_path: Path, zip_format: bool) -> None:
    encoder, want = _old_encoder(src_modeling)
    path = _save_old_style(encoder, tmp_path / "encoder.pt", zip_format)
    names = _pickled_strings(path)
    # the fixture really has the old layout: old attributes present, every newer one absent
    assert {"_forward_pre_hooks", "_load_state_dict_pre_hooks", "src.modeling", "open_clip.transformer"} <= names
    assert NEWER_MODULE_ATTRS and not NEWER_MODULE_ATTRS & names
    assert {"head.mask", "head.blocks.2.running_var", "head.blocks.2.num_batches_tracked"} <= set(want)
    out = convert_legacy_checkpoint(path, tmp_path / "encoder.safetensors")
    _assert_exact(read_state_dict(out), want)


def test_old_torch_module_pickle_through_the_store(src_modeling, tmp_path: Path) -> None:
    encoder, want = _old_encoder(src_modeling)
    path = _save_old_style(encoder, tmp_path / "finetuned.pt", zip_format=False)
    artifact = ArtifactStore(tmp_path / "store").acquire(PathSource(name="MNIST", path=str(path), legacy_pickle=True))
    _assert_exact(read_state_dict(artifact.path), want)


def test_missing_module_attributes_come_from_a_fresh_module(src_modeling, tmp_path: Path, monkeypatch) -> None:
    """The filled-in attributes are whatever ``nn.Module.__init__`` sets now, not a hand-kept list."""
    encoder, want = _old_encoder(src_modeling)
    path = _save_old_style(encoder, tmp_path / "encoder.pt", zip_format=True)
    init = torch.nn.Module.__init__

    def future_init(self: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        object.__setattr__(self, "_attribute_of_a_future_torch", OrderedDict())

    monkeypatch.setattr(torch.nn.Module, "__init__", future_init)
    obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PickleModule)
    stubs = list(obj.modules())
    assert len(stubs) > 5 and all(type(m).__module__ == "mergeflow.legacy.stubs" for m in stubs)
    assert all(isinstance(m.__dict__.get("_attribute_of_a_future_torch"), OrderedDict) for m in stubs)
    assert all(m._attribute_of_a_future_torch is not stubs[0]._attribute_of_a_future_torch for m in stubs[1:])
    _assert_exact(load_legacy_state_dict(path), want)


def test_pickled_attributes_are_kept_over_defaults(tmp_path: Path) -> None:
    """A pickled ``_non_persistent_buffers_set`` (newer files) still keeps its buffers out of the result."""
    module = torch.nn.Sequential(torch.nn.Linear(3, 2))
    module.register_buffer("position_ids", torch.arange(5), persistent=False)
    module.training = False
    path = tmp_path / "new.pt"
    torch.save(module, path)
    got = load_legacy_state_dict(path)
    assert set(got) == {"0.weight", "0.bias"}
    _assert_exact(got, module.state_dict())


class _Payload:
    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, ("touch PWNED_OLD",)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-format"])
def test_os_system_in_an_old_module_tree_is_refused(src_modeling, tmp_path: Path, monkeypatch, zip_format) -> None:
    monkeypatch.chdir(tmp_path)
    encoder, _ = _old_encoder(src_modeling)
    encoder.train_preprocess.fn = _Payload()  # runs os.system when unpickled by a plain unpickler
    path = _save_old_style(encoder, tmp_path / "evil.pt", zip_format)
    assert "system" in _pickled_strings(path)
    with pytest.raises(CheckpointError, match="legacy conversion failed") as info:
        convert_legacy_checkpoint(path, tmp_path / "evil.safetensors")
    assert "\n" not in str(info.value) and "evil.pt" in str(info.value)
    assert not (tmp_path / "PWNED_OLD").exists() and not (tmp_path / "evil.safetensors").exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-format"])
def test_pickled_hooks_are_neutralised(src_modeling, tmp_path: Path, monkeypatch, zip_format) -> None:
    """``state_dict()`` calls state-dict hooks; ones from the file (here naming os.system) are never called."""
    monkeypatch.chdir(tmp_path)
    encoder, want = _old_encoder(src_modeling)
    encoder.head._state_dict_hooks[0] = os.system
    encoder.head.blocks[0]._forward_pre_hooks[1] = os.system
    path = _save_old_style(encoder, tmp_path / "hooked.pt", zip_format)
    assert "system" in _pickled_strings(path)
    out = convert_legacy_checkpoint(path, tmp_path / "hooked.safetensors")
    _assert_exact(read_state_dict(out), want)
    assert not (tmp_path / "PWNED_OLD").exists()


def test_plain_payload_is_still_refused_in_the_legacy_format(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": _Payload()}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy conversion failed"):
        convert_legacy_checkpoint(path, tmp_path / "evil.safetensors")
    assert not (tmp_path / "PWNED_OLD").exists() and not (tmp_path / "evil.safetensors").exists()


# --- wrong pins ---------------------------------------------------------------------------------


def _good_bytes() -> bytes:
    g = torch.Generator().manual_seed(3)
    return save_bytes({"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)})


GOOD = _good_bytes()
TRUNCATED = GOOD[: len(GOOD) // 2]  # header intact, data cut: a download that stopped halfway
GOOD_SHA, TRUNCATED_SHA = hashlib.sha256(GOOD).hexdigest(), hashlib.sha256(TRUNCATED).hexdigest()


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert isinstance(exc, MergeflowError) and "\n" not in text
    return text


class _Provider:
    """Provides a source's file either at its local path or by hand in --from-dir."""

    def __init__(self, tmp_path: Path, mode: str) -> None:
        self.mode = mode
        self.from_dir = tmp_path / "provided" if mode == "from_dir" else None
        if mode == "path":
            self.target = tmp_path / "downloads" / "m.safetensors"
            self.source: Any = PathSource(name="m", path=str(self.target))
        else:
            self.source = HubSource(name="m", repo="org/ckpts", filename="single_task/MNIST/model.safetensors")
            self.target = tmp_path / "provided" / "org/ckpts/single_task/MNIST/model.safetensors"

    def provide(self, data: bytes) -> None:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.target.write_bytes(data)


@pytest.fixture(params=["path", "from_dir"])
def provider(request, tmp_path: Path) -> _Provider:
    return _Provider(tmp_path, request.param)


def _store(root: Path, tmp_path: Path) -> ArtifactStore:
    (tmp_path / "hub").mkdir(exist_ok=True)
    return ArtifactStore(root, hub_cache=tmp_path / "hub")


def test_truncated_first_acquisition_says_how_to_repin(provider: _Provider, tmp_path: Path) -> None:
    store = _store(tmp_path / "store", tmp_path)
    identity = provider.source.identity()
    provider.provide(TRUNCATED)
    with pytest.raises(CheckpointError) as info:
        store.acquire(provider.source, provider.from_dir)
    text = _one_line(info.value)
    assert store.lock()[identity]["sha256"] == TRUNCATED_SHA  # the first acquisition pinned it
    assert store.lock()[identity]["size"] == len(TRUNCATED)
    assert text.startswith("m: ") and "truncated" in text
    assert f"pins {identity} to sha256 {TRUNCATED_SHA}, {len(TRUNCATED)} bytes" in text
    assert str(store.lock_path) in text and f"--repin {shlex.quote(identity)}" in text
    # the right file now arrives, but the pinned (truncated) file is what the store keeps serving
    provider.provide(GOOD)
    with pytest.raises(CheckpointError, match="--repin"):
        store.acquire(provider.source, provider.from_dir)
    # following the hint: --repin drops the pin (and the bad file), the next acquisition pins the good one
    assert store.unpin(identity) == [identity]
    assert identity not in store.lock() and not store.file_path(TRUNCATED_SHA).exists()
    artifact = store.acquire(provider.source, provider.from_dir)
    assert artifact.sha256 == GOOD_SHA and store.lock()[identity]["sha256"] == GOOD_SHA
    assert read_state_dict(artifact.path).keys() == {"w", "b"}


def test_wrong_pin_on_another_machine_says_what_why_and_how(provider: _Provider, tmp_path: Path) -> None:
    """A lock.json committed with a bad pin, used by a store that does not hold the pinned file."""
    first = _store(tmp_path / "first", tmp_path)
    identity = provider.source.identity()
    provider.provide(TRUNCATED)
    with pytest.raises(CheckpointError):
        first.acquire(provider.source, provider.from_dir)
    clone = _store(tmp_path / "clone", tmp_path)
    shutil.copyfile(first.lock_path, clone.lock_path)
    provider.provide(GOOD)
    with pytest.raises(CheckpointError) as info:
        clone.acquire(provider.source, provider.from_dir)
    text = _one_line(info.value)
    assert text.startswith("m: ")
    assert f"has sha256 {GOOD_SHA} ({len(GOOD)} bytes)" in text  # why: what the file is
    assert f"{clone.lock_path} pins {identity} to sha256 {TRUNCATED_SHA}, {len(TRUNCATED)} bytes" in text  # what
    assert f"--repin {shlex.quote(identity)}" in text  # how
    assert f"delete the {json.dumps(identity)} entry from {clone.lock_path}" in text
    # following the second hint: delete the entry from lock.json by hand
    lock = json.loads(clone.lock_path.read_text())
    del lock[identity]
    clone.lock_path.write_text(json.dumps(lock))
    artifact = clone.acquire(provider.source, provider.from_dir)
    assert artifact.sha256 == GOOD_SHA and clone.lock()[identity]["sha256"] == GOOD_SHA


def test_declared_sha256_mismatch_does_not_suggest_repinning(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(TRUNCATED)
    source = PathSource(name="m", path=str(path), sha256=GOOD_SHA)
    with pytest.raises(CheckpointError) as info:
        ArtifactStore(tmp_path / "store").acquire(source)
    text = _one_line(info.value)
    assert f"has sha256 {TRUNCATED_SHA} ({len(TRUNCATED)} bytes)" in text
    assert f"declares sha256 {GOOD_SHA}" in text and "--repin" not in text


class _DirServer:
    """Serves a directory over loopback HTTP."""

    def __init__(self, root: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_wrong_pin_of_a_url_says_how_to_repin(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    server = _DirServer(served)
    try:
        source = UrlSource(name="m", url=f"{server.url}/m.safetensors")
        (served / "m.safetensors").write_bytes(TRUNCATED)
        store = ArtifactStore(tmp_path / "store")
        with pytest.raises(CheckpointError, match="--repin"):
            store.acquire(source)
        (served / "m.safetensors").write_bytes(GOOD)
        shutil.rmtree(store.root / "files")  # the pinned file is gone: the server is asked again
        with pytest.raises(HashMismatchError) as info:
            store.acquire(source)
        text = _one_line(info.value)
        assert f"sha256 {GOOD_SHA} does not match" in text
        assert f"pins {source.identity()} to sha256 {TRUNCATED_SHA}" in text
        assert f"--repin {shlex.quote(source.identity())}" in text
        store.unpin(source.identity())
        assert store.acquire(source).sha256 == GOOD_SHA
    finally:
        server.close()


def test_unpin_by_name_and_its_errors(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "m.safetensors").write_bytes(GOOD)
        store.acquire(PathSource(name="MNIST", path=str(tmp_path / sub / "m.safetensors")))
    (tmp_path / "c.safetensors").write_bytes(TRUNCATED)
    with pytest.raises(CheckpointError):
        store.acquire(PathSource(name="other", path=str(tmp_path / "c.safetensors")))
    with pytest.raises(ConfigError, match="matches 2 pinned sources") as info:
        store.unpin("MNIST")
    _one_line(info.value)
    with pytest.raises(ConfigError, match="no pinned source"):
        store.unpin("nope")
    assert store.unpin("other") == [f"path:{tmp_path / 'c.safetensors'}"]
    # one identity dropped: the file both MNIST entries pin stays in the store
    assert store.unpin(f"path:{tmp_path / 'a' / 'm.safetensors'}") and store.file_path(GOOD_SHA).exists()
    assert set(store.lock()) == {f"path:{tmp_path / 'b' / 'm.safetensors'}"}


# --- names that would leave --from-dir ----------------------------------------------------------

BAD_NAMES = ["../secret.safetensors", "/abs/secret.safetensors", "a/b", "a\\b", "..", ".", "", "x\0y"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_source_names_must_be_plain(bad: str) -> None:
    with pytest.raises(ValidationError, match="source name"):
        PathSource(name=bad, path="/data/m.safetensors")
    with pytest.raises(ValidationError, match="source name"):
        HubSource(name=bad, repo="org/repo", filename="m.safetensors")


@pytest.mark.parametrize("repo", ["org/..", "org/."])
def test_hub_repos_cannot_be_dot_names(repo: str) -> None:
    with pytest.raises(ValidationError, match="unsafe repository"):
        HubSource(name="x", repo=repo, filename="m.safetensors")


@pytest.mark.parametrize("filename", ["a/./b", "./b", "a//b", "a/b/", "a\0b"])
def test_hub_filenames_cannot_hold_dot_or_empty_parts(filename: str) -> None:
    with pytest.raises(ValidationError, match="unsafe repository path"):
        HubSource(name="x", repo="org/repo", filename=filename)


@pytest.mark.parametrize(
    "url", ["https://host/files/..", "https://host/files/.", "https://host/files/", "http://h/a\\b"]
)
def test_url_tails_must_be_file_names(url: str) -> None:
    with pytest.raises(ValidationError, match="last URL segment"):
        UrlSource(name="x", url=url)


def test_params_yaml_reports_an_unsafe_name_in_one_line(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("acquire:\n  sources:\n    - {kind: path, name: ../../etc/passwd, path: /data/m.safetensors}\n")
    with pytest.raises(ConfigError) as info:
        load_config(params)
    text = _one_line(info.value)
    assert str(params) in text and "acquire.sources.0" in text and "../../etc/passwd" in text


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A valid checkpoint outside --from-dir, which an escape would find and adopt."""
    (tmp_path / "outside").mkdir()
    target = tmp_path / "outside" / "secret.safetensors"
    target.write_bytes(GOOD)
    (tmp_path / "provided").mkdir()
    return target


def _assert_nothing_read(store: ArtifactStore) -> None:
    assert store.lock() == {} and not any(p.is_file() for p in (store.root / "files").rglob("*"))


UNVALIDATED = {
    "name-dotdot": lambda outside: PathSource.model_construct(name="../outside/secret.safetensors", path="/none"),
    "name-absolute": lambda outside: PathSource.model_construct(name=str(outside), path="/none"),
    "repo-dotdot": lambda outside: HubSource.model_construct(
        name="x", repo="org/..", filename="../outside/secret.safetensors"
    ),
    "filename-dotdot": lambda outside: HubSource.model_construct(
        name="x", repo="org/repo", filename="../../../outside/secret.safetensors"
    ),
    "url-dotdot": lambda outside: UrlSource.model_construct(name="x", url="https://host/.."),
}


@pytest.mark.parametrize("make", UNVALIDATED.values(), ids=UNVALIDATED.keys())
def test_unvalidated_sources_cannot_escape_from_dir(make: Any, outside: Path, tmp_path: Path) -> None:
    """Where the path is built the parts are checked again (sources built without validation)."""
    source = make(outside)
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(CheckpointError, match="cannot be looked up in --from-dir") as info:
        store.acquire(source, tmp_path / "provided")
    text = _one_line(info.value)
    assert text.startswith(f"{source.name}: ") and str(tmp_path / "provided") in text
    _assert_nothing_read(store)


def test_symlink_out_of_from_dir_is_refused(outside: Path, tmp_path: Path) -> None:
    os.symlink(outside, tmp_path / "provided" / "m")
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(CheckpointError, match="outside --from-dir") as info:
        store.acquire(PathSource(name="m", path="/nonexistent/m.safetensors"), tmp_path / "provided")
    text = _one_line(info.value)
    assert text.startswith("m: ") and str(outside.resolve()) in text
    _assert_nothing_read(store)


def test_symlinked_directory_out_of_from_dir_is_refused(outside: Path, tmp_path: Path) -> None:
    os.symlink(outside.parent, tmp_path / "provided" / "org")
    (outside.parent / "ckpts").mkdir()
    (outside.parent / "ckpts" / "m.safetensors").write_bytes(GOOD)
    (tmp_path / "hub").mkdir()
    store = ArtifactStore(tmp_path / "store", hub_cache=tmp_path / "hub")
    with pytest.raises(CheckpointError, match="outside --from-dir"):
        store.acquire(HubSource(name="m", repo="org/ckpts", filename="m.safetensors"), tmp_path / "provided")
    _assert_nothing_read(store)


def test_dangling_symlink_out_of_from_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "provided").mkdir()
    os.symlink(tmp_path / "not-there", tmp_path / "provided" / "m")
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(CheckpointError, match="outside --from-dir"):
        store.acquire(PathSource(name="m", path="/nonexistent/m.safetensors"), tmp_path / "provided")


def test_symlink_within_from_dir_is_accepted(tmp_path: Path) -> None:
    provided = tmp_path / "provided"
    (provided / "real").mkdir(parents=True)
    (provided / "real" / "m.safetensors").write_bytes(GOOD)
    os.symlink(Path("real") / "m.safetensors", provided / "m")
    artifact = ArtifactStore(tmp_path / "store").acquire(PathSource(name="m", path="/nonexistent"), provided)
    assert artifact.sha256 == GOOD_SHA


def test_repin_from_the_command_line(tmp_path: Path) -> None:
    """What a user types: a bad first download pins, the error says `--repin`, and `--repin` fixes it."""
    import subprocess

    source_file = tmp_path / "m.safetensors"
    source_file.write_bytes(TRUNCATED)
    params = tmp_path / "params.yaml"
    params.write_text(
        f"acquire:\n  store: {tmp_path / 'store'}\n  sources:\n    - {{kind: path, name: m, path: {source_file}}}\n"
    )

    def acquire(*extra: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "mergeflow.cli", "-q", "acquire", "--params", str(params), *extra]
        return subprocess.run(command, capture_output=True, text=True, check=False, cwd=tmp_path)

    first = acquire()
    assert first.returncode == 2 and "--repin" in first.stderr and len(first.stderr.strip().splitlines()) == 1
    source_file.write_bytes(GOOD)
    assert acquire().returncode == 2  # still pinned to the truncated bytes
    fixed = acquire("--repin", f"path:{source_file}")
    assert fixed.returncode == 0, fixed.stderr
    assert GOOD_SHA in fixed.stdout
