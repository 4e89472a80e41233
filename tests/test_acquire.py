"""Acquisition: downloads against a loopback server, a local Hub cache, the store's pinning, legacy
pickles, and the HF CLIP <-> open_clip conversion."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import random_state_dicts
from pydantic import ValidationError
from safetensors.torch import save as save_bytes

from mergeflow.checkpoint import open_checkpoint, read_state_dict
from mergeflow.download import DownloadError, HashMismatchError, download
from mergeflow.errors import CheckpointError
from mergeflow.legacy import convert_legacy_checkpoint
from mergeflow.sources import HubSource, OpenClipSource, PathSource, UrlSource
from mergeflow.store import ArtifactStore, MissingArtifactsError, open_clip_hub_source
from mergeflow.synthetic import open_clip_visual_layout

PLAIN = open_clip_visual_layout(width=24, layers=2, patch=4, image=8, output_dim=16)  # no key prefix


def _checkpoint_bytes(seed: int = 0) -> bytes:
    base, _ = random_state_dicts(PLAIN, tasks=0, seed=seed, dtype=torch.float32)
    return save_bytes({f"model.visual.{k}": v for k, v in base.items()})


class _Server:
    """Loopback HTTP server with Range support; ``cut_once`` files drop the first transfer halfway."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut_once: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                outer.requests.append((name, rng))
                if name not in outer.files:
                    self.send_error(404)
                    return
                data = outer.files[name]
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(data) - start))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                body = data[start:]
                if name in outer.cut_once:
                    outer.cut_once.discard(name)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = _Server()
    yield srv
    srv.close()


def test_download_good_file(server, tmp_path: Path) -> None:
    data = _checkpoint_bytes()
    server.files["good.safetensors"] = data
    digest = download(f"{server.url}/good.safetensors", tmp_path / "g", hashlib.sha256(data).hexdigest(), backoff=0)
    assert (tmp_path / "g").read_bytes() == data and digest == hashlib.sha256(data).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]


def test_wrong_hash_leaves_nothing(server, tmp_path: Path) -> None:
    server.files["bad"] = b"not what you expected" * 100
    with pytest.raises(HashMismatchError, match="does not match"):
        download(f"{server.url}/bad", tmp_path / "b", "0" * 64, backoff=0)
    assert list(tmp_path.iterdir()) == []


def test_cut_transfer_resumes_with_range(server, tmp_path: Path) -> None:
    data = _checkpoint_bytes(1)
    server.files["cut"] = data
    server.cut_once.add("cut")
    digest = download(f"{server.url}/cut", tmp_path / "c", hashlib.sha256(data).hexdigest(), backoff=0)
    assert digest == hashlib.sha256(data).hexdigest() and (tmp_path / "c").read_bytes() == data
    assert server.requests[0] == ("cut", None)
    assert server.requests[1] == ("cut", f"bytes={len(data) // 2}-")  # resumed where it was cut


def test_interrupted_call_resumes_on_the_next_call(server, tmp_path: Path) -> None:
    data = _checkpoint_bytes(2)
    server.files["cut2"] = data
    server.cut_once.add("cut2")
    with pytest.raises(DownloadError, match="partial bytes kept"):
        download(f"{server.url}/cut2", tmp_path / "c2", retries=0, backoff=0)
    assert not (tmp_path / "c2").exists() and (tmp_path / "c2.part").stat().st_size == len(data) // 2
    download(f"{server.url}/cut2", tmp_path / "c2", hashlib.sha256(data).hexdigest(), backoff=0)
    assert (tmp_path / "c2").read_bytes() == data and not (tmp_path / "c2.part").exists()


def test_size_bound_and_missing_file(server, tmp_path: Path) -> None:
    server.files["big"] = b"x" * 5000
    with pytest.raises(DownloadError, match="exceeds the limit"):
        download(f"{server.url}/big", tmp_path / "x", max_bytes=1000, backoff=0)
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{server.url}/nope", tmp_path / "y", backoff=0)
    assert list(tmp_path.iterdir()) == []


def test_store_pins_hash_on_first_use_then_hits_cache(server, tmp_path: Path) -> None:
    data = _checkpoint_bytes(3)
    server.files["m.safetensors"] = data
    store = ArtifactStore(tmp_path / "store")
    source = UrlSource(name="m", url=f"{server.url}/m.safetensors", select_prefix="model.visual.")
    first = store.acquire(source)
    assert store.lock()[source.identity()]["sha256"] == hashlib.sha256(data).hexdigest()
    with open_checkpoint(first.path) as reader:
        assert "conv1.weight" in reader.keys() and not any(k.startswith("model.") for k in reader.keys())
        assert reader.metadata["mergeflow.source_sha256"] == first.sha256
    count = len(server.requests)
    again = store.acquire(source)
    assert again.path == first.path and len(server.requests) == count  # no new transfer
    # the server now serves other bytes: once the cached file is gone, the pin refuses them
    server.files["m.safetensors"] = _checkpoint_bytes(4)
    shutil.rmtree(tmp_path / "store" / "files")
    shutil.rmtree(tmp_path / "store" / "safetensors")
    with pytest.raises(HashMismatchError):
        store.acquire(source)


def test_corrupt_download_is_reported(server, tmp_path: Path) -> None:
    server.files["junk.bin"] = b"\x80\x04garbage that is no pickle"
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(CheckpointError, match="junk"):
        store.acquire(UrlSource(name="junk", url=f"{server.url}/junk.bin"))


def _fake_hub_cache(cache: Path, repo: str, files: dict[str, bytes], commit: str = "a" * 40) -> None:
    """The on-disk layout huggingface_hub reads offline: blobs, snapshots/<commit>, refs/main."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)


def test_hub_source_from_local_cache_pins_commit(tmp_path: Path) -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    data = _checkpoint_bytes(5)
    _fake_hub_cache(tmp_path / "hub", "org/ckpts", {"single_task/ViT-B-32/MNISTVal/nonlinear_finetuned.pt": data})
    store = ArtifactStore(tmp_path / "store", hub_cache=tmp_path / "hub")
    source = HubSource(
        name="MNIST", repo="org/ckpts", filename="single_task/ViT-B-32/MNISTVal/nonlinear_finetuned.pt",
        select_prefix="model.visual.",
    )  # fmt: skip
    artifact = store.acquire(source)
    assert store.lock()[source.identity()]["commit"] == "a" * 40
    assert set(read_state_dict(artifact.path)) == set(PLAIN)


def test_missing_artifacts_are_listed_with_instructions(tmp_path: Path) -> None:
    (tmp_path / "hub").mkdir()
    store = ArtifactStore(tmp_path / "store", hub_cache=tmp_path / "hub")
    sources = [
        HubSource(name="SVHN", repo="org/ckpts", filename="a/SVHNVal/nonlinear_finetuned.pt"),
        PathSource(name="local", path=str(tmp_path / "absent.safetensors")),
    ]
    with pytest.raises(MissingArtifactsError) as info:
        store.acquire_all(sources)
    text = str(info.value)
    assert "2 of 2 artifact(s)" in text and "hf://org/ckpts/a/SVHNVal/nonlinear_finetuned.pt@main" in text
    assert "--from-dir" in text and "absent.safetensors" in text
    # provided by hand in --from-dir, they are found and pinned
    provided = tmp_path / "manual"
    (provided / "org/ckpts/a/SVHNVal").mkdir(parents=True)
    (provided / "org/ckpts/a/SVHNVal/nonlinear_finetuned.pt").write_bytes(_checkpoint_bytes(6))
    (provided / "local").write_bytes(_checkpoint_bytes(7))
    artifacts = store.acquire_all(sources, from_dir=provided)
    assert [a.name for a in artifacts] == ["SVHN", "local"]


@pytest.mark.parametrize("bad", ["../etc/passwd", "/abs/file", "a/../../b", "a\\b", ""])
def test_repository_paths_cannot_escape(bad: str) -> None:
    with pytest.raises(ValidationError):
        HubSource(name="x", repo="org/repo", filename=bad)


def test_open_clip_source_resolves_to_its_hub_file(tmp_path: Path) -> None:
    hub = open_clip_hub_source(OpenClipSource(name="theta0", model="ViT-B-32", tag="openai"))
    assert (hub.repo, hub.filename, hub.select_prefix) == (
        "timm/vit_base_patch32_clip_224.openai",
        "open_clip_pytorch_model.bin",
        "visual.",
    )
    base, _ = random_state_dicts(PLAIN, tasks=0, seed=8, dtype=torch.float32)
    pt = tmp_path / "model.bin"
    torch.save({f"visual.{k}": v for k, v in base.items()} | {"logit_scale": torch.tensor(4.6)}, pt)
    _fake_hub_cache(tmp_path / "hub", hub.repo, {hub.filename: pt.read_bytes()})
    store = ArtifactStore(tmp_path / "store", hub_cache=tmp_path / "hub")
    artifact = store.acquire(OpenClipSource(name="theta0", model="ViT-B-32", tag="openai"))
    got = read_state_dict(artifact.path)
    assert set(got) == set(base) and all(torch.equal(got[k], base[k]) for k in base)


# --- legacy pickles ----------------------------------------------------------------------------


def _tiny_vision_tower() -> torch.nn.Module:
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32)
    torch.manual_seed(0)
    return _build_vision_tower(32, cfg, quick_gelu=True).eval()


def test_legacy_module_pickle_converts_in_a_subprocess(tmp_path: Path) -> None:
    module = _tiny_vision_tower()
    path = tmp_path / "legacy.pt"
    torch.save(module, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        read_state_dict(path)
    out = convert_legacy_checkpoint(path, tmp_path / "legacy.safetensors")
    got = read_state_dict(out)
    want = module.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_legacy_module_from_an_unimportable_package(tmp_path: Path) -> None:
    """The original release pickles ``src.modeling.ImageEncoder``; that module does not exist here."""
    code = f"""
import sys, types, torch
mod = types.ModuleType("src_modeling_gone"); sys.modules["src_modeling_gone"] = mod
class ImageEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__(); self.model = torch.nn.Sequential(torch.nn.Linear(3, 4))
ImageEncoder.__module__ = "src_modeling_gone"; mod.ImageEncoder = ImageEncoder
torch.manual_seed(0); enc = ImageEncoder()
torch.save(enc, {str(tmp_path / "enc.pt")!r}); torch.save(enc.state_dict(), {str(tmp_path / "want.pt")!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    got = read_state_dict(convert_legacy_checkpoint(tmp_path / "enc.pt", tmp_path / "enc.safetensors"))
    want = torch.load(tmp_path / "want.pt", weights_only=True)
    assert set(got) == {"model.0.weight", "model.0.bias"} and all(torch.equal(got[k], want[k]) for k in want)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_LEGACY",))


def test_legacy_converter_never_runs_pickled_code(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": _Payload()}, path)
    with pytest.raises(CheckpointError, match="legacy conversion failed"):
        convert_legacy_checkpoint(path, tmp_path / "evil.safetensors")
    assert not (tmp_path / "PWNED_LEGACY").exists() and not (tmp_path / "evil.safetensors").exists()


def test_store_converts_legacy_only_when_opted_in(tmp_path: Path) -> None:
    module = _tiny_vision_tower()
    path = tmp_path / "legacy.pt"
    torch.save(module, path)
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(CheckpointError, match="legacy_pickle: true"):
        store.acquire(PathSource(name="old", path=str(path)))
    artifact = store.acquire(PathSource(name="old", path=str(path), legacy_pickle=True))
    assert set(read_state_dict(artifact.path)) == set(module.state_dict())


# --- HF CLIP <-> open_clip ---------------------------------------------------------------------


def test_hf_clip_and_open_clip_layouts_give_identical_features() -> None:
    transformers = pytest.importorskip("transformers")
    from mergeflow.convert import hf_clip_vision_to_open_clip, open_clip_to_hf_clip_vision

    tower = _tiny_vision_tower()
    config = transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )  # fmt: skip
    hf = transformers.CLIPVisionModelWithProjection(config).eval()
    hf_state = open_clip_to_hf_clip_vision(tower.state_dict())
    missing, unexpected = hf.load_state_dict(hf_state, strict=False)
    assert not unexpected and set(missing) <= {"vision_model.embeddings.position_ids"}
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = tower(images)
        theirs = hf(pixel_values=images).image_embeds
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    back = hf_clip_vision_to_open_clip(hf.state_dict())
    assert set(back) == set(tower.state_dict())
    assert all(torch.equal(back[k], v) for k, v in tower.state_dict().items())


def test_dvc_tracks_the_store(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(["dvc", "init", "-q"], check=True)
    store = ArtifactStore(tmp_path / "store")
    (tmp_path / "f.safetensors").write_bytes(_checkpoint_bytes(9))
    store.acquire(PathSource(name="f", path=str(tmp_path / "f.safetensors")))
    dvc_file = store.track_with_dvc()
    assert dvc_file.exists() and "md5" in dvc_file.read_text()


def test_cli_acquires_a_preset_offline_and_merges_its_manifest(tmp_path: Path, capsys) -> None:
    """The README's path for an offline machine: files provided by hand, then merge the manifest."""
    from mergeflow.cli import main
    from mergeflow.presets import get_preset

    preset = get_preset("clip-vit-b32-8tasks")
    base, tuned = random_state_dicts(PLAIN, tasks=len(preset.finetuned), seed=11, dtype=torch.float32)
    provided = tmp_path / "provided"
    for source, sd in zip([preset.pretrained, *preset.finetuned], [base, *tuned], strict=True):
        target = provided / source.repo / source.filename
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save({f"model.visual.{k}": v for k, v in sd.items()}, target)
    store = tmp_path / "store"
    params = tmp_path / "params.yaml"
    params.write_text(f"acquire: {{store: {store}}}\n")
    code = main(["-q", "acquire", "--preset", preset.name, "--params", str(params), "--from-dir", str(provided)])
    assert code == 0
    manifest = store / "manifests" / f"{preset.name}.json"
    printed = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in printed[:9]] == ["zeroshot", *preset.tasks]  # in preset order
    assert str(manifest) in printed[9]
    out = tmp_path / "cart.safetensors"
    assert main(["-q", "merge", "--method", "cart", "--manifest", str(manifest), "--output", str(out)]) == 0
    merged = read_state_dict(out)
    assert set(merged) == set(base)
    lock = ArtifactStore(store).lock()
    assert len(lock) == 9 and all(len(entry["sha256"]) == 64 for entry in lock.values())


def test_presets_describe_the_paper_settings() -> None:
    from mergeflow.presets import PRESETS, TASKS_20

    b8 = PRESETS["clip-vit-b32-8tasks"]
    assert [s.name for s in b8.finetuned] == ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"]
    assert b8.methods["cart"] == {"scaling": 2.0, "rank_ratio": 0.12, "selector": "attn_mlp"}
    assert b8.published["cart"] == 84.7
    assert b8.finetuned[0].filename == "single_task/ViT-B-32/SUN397Val/nonlinear_finetuned.pt"
    b20 = PRESETS["clip-vit-b32-20tasks"]
    assert b20.tasks == TASKS_20 and b20.methods["cart"]["rank_ratio"] == 0.32
    assert PRESETS["clip-vit-l14-8tasks"].pretrained.filename.startswith("single_task/ViT-L-14/")
    hf = PRESETS["clip-vit-b32-8tasks-hf"]
    assert all(s.convert == "hf_clip_vision" for s in hf.finetuned) and hf.checkpoint_set == "fusionbench_hf"
