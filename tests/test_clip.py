"""The real CLIP path on tiny stand-ins: the task catalogue, zero-shot heads and their cache, dataset
loaders (ImageFolder trees, torchvision files, Hugging Face datasets) with the field's validation split,
and a `clip` zoo (random-init tiny open_clip CLIP, fake images) run through the whole pipeline."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import prefect_harness
from PIL import Image

from mergeflow.clip.datasets import DatasetError, ImageFolderImages, open_images, validation_split
from mergeflow.clip.heads import cached_head, head_key, zeroshot_head
from mergeflow.clip.models import CLIP_TINY, Preprocess, create_model
from mergeflow.clip.tasks import TASK_SETS, TaskSpec, known_tasks, task_spec, templates_hash
from mergeflow.errors import ConfigError
from mergeflow.writer import save_state_dict

SIZES = {"SUN397": 397, "Cars": 196, "RESISC45": 45, "EuroSAT": 10, "SVHN": 10, "GTSRB": 43, "MNIST": 10, "DTD": 47,
         "CIFAR100": 100, "STL10": 10, "Flowers102": 102, "OxfordIIITPet": 37, "PCAM": 2, "FER2013": 7, "EMNIST": 10,
         "CIFAR10": 10, "Food101": 101, "FashionMNIST": 10, "RenderedSST2": 2, "KMNIST": 10}  # fmt: skip


# --- the task catalogue ---------------------------------------------------------------------------


def test_catalogue_covers_the_20_tasks_with_their_class_counts() -> None:
    assert known_tasks() == TASK_SETS[20]
    assert TASK_SETS[8] == TASK_SETS[20][:8] and TASK_SETS[14] == TASK_SETS[20][:14]
    for name, count in SIZES.items():
        spec = task_spec(name)
        assert len(spec.classes) == count, name
        flat = [c if isinstance(c, str) else c[0] for c in spec.classes]
        assert len(set(flat)) == count, f"{name}: duplicate class names"
        assert all("{c}" in t for t in spec.templates)
    assert task_spec("EuroSAT").folders[0] == "AnnualCrop"
    assert task_spec("GTSRB").templates[0] == 'a zoomed in photo of a "{c}" traffic sign.'
    with pytest.raises(ConfigError, match="unknown CLIP task"):
        task_spec("ImageNet-21k")


def test_synonyms_give_every_name_every_template() -> None:
    fer = task_spec("FER2013")
    assert fer.classes[3] == ("happy", "smiling")
    prompts = fer.prompts(3)
    assert len(prompts) == 2 * len(fer.templates)
    assert prompts[0] == "a photo of a happy looking face."
    assert prompts[len(fer.templates)] == "a photo of a smiling looking face."


def test_templates_hash_changes_with_names_order_and_templates() -> None:
    base = templates_hash(["a", "b"], ["a photo of {c}."])
    assert base == templates_hash(("a", "b"), ("a photo of {c}.",))
    assert base != templates_hash(["b", "a"], ["a photo of {c}."])
    assert base != templates_hash(["a", "b"], ["a picture of {c}."])
    with pytest.raises(ValueError, match="no"):
        TaskSpec(name="x", classes=("a",), templates=("no placeholder",), loader={})


# --- validation split ------------------------------------------------------------------------------


def test_validation_split_is_the_reference_protocol() -> None:
    train, val = validation_split(60000)  # MNIST: 10% capped at 5000, seed 0
    assert len(val) == 5000 and len(train) == 55000 and set(train).isdisjoint(val)
    assert sorted(train + val) == list(range(60000))
    assert train[0] == 36044  # the first MNISTVal training index asserted by the task-vectors code
    ref_train, ref_val = torch.utils.data.random_split(range(1234), [1234 - 123, 123],
                                                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert validation_split(1234) == (list(ref_train.indices), list(ref_val.indices))
    assert validation_split(1234, seed=1) != validation_split(1234)
    with pytest.raises(DatasetError, match="cannot give a validation split"):
        validation_split(5)


# --- heads -----------------------------------------------------------------------------------------


def _fake_encoder(calls: list[int]):
    def encode(prompts: list[str]) -> torch.Tensor:
        calls.append(len(prompts))
        rows = []
        for p in prompts:
            seed = int(hashlib.sha256(p.encode()).hexdigest()[:8], 16)
            rows.append(torch.randn(6, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(rows)

    return encode


def test_zeroshot_head_matches_a_float64_reference() -> None:
    spec = TaskSpec(name="t", classes=("cat", ("dog", "puppy"), "emu"), templates=("a {c}.", "the {c}!"), loader={})
    head = zeroshot_head(_fake_encoder([]), spec, logit_scale=100.0)
    for i in range(3):
        e = _fake_encoder([])(spec.prompts(i)).double()
        e = e / e.norm(dim=-1, keepdim=True)
        m = e.mean(0)
        expected = 100.0 * m / m.norm()
        torch.testing.assert_close(head[i].double(), expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(head.norm(dim=-1), torch.full((3,), 100.0))


def test_heads_are_cached_by_model_revision_task_and_templates(tmp_path: Path) -> None:
    calls: list[int] = []
    spec = TaskSpec(name="t", classes=("cat", "dog"), templates=("a {c}.",), loader={})

    def encoder():
        return _fake_encoder(calls), 10.0

    path, hit = cached_head(tmp_path, "m", "rev1", spec, encoder)
    assert not hit and len(calls) == 2
    again, hit = cached_head(tmp_path, "m", "rev1", spec, encoder)
    assert hit and again == path and len(calls) == 2  # not encoded again
    other = spec.model_copy(update={"templates": ("the {c}.",)})
    assert cached_head(tmp_path, "m", "rev1", other, encoder)[0] != path
    assert head_key("m", "rev2", spec) != head_key("m", "rev1", spec) != head_key("m2", "rev1", spec)


# --- datasets --------------------------------------------------------------------------------------


def _image(path: Path, colour: tuple[int, int, int], size: int = 20, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _tree(root: Path, folders: list[str], per_class: int, seed: int = 0) -> None:
    for c, folder in enumerate(folders):
        for i in range(per_class):
            colour = ((37 * c) % 256, (91 * c) % 256, (53 * c + 40) % 256)
            _image(root / folder / f"img{i:02d}.png", colour, size=16 + 4 * (i % 3), seed=seed + 100 * c + i)


def test_imagefolder_order_labels_and_errors(tmp_path: Path) -> None:
    from torchvision.datasets import ImageFolder

    _tree(tmp_path / "plain", ["b", "a", "c"], 3)
    images = ImageFolderImages(tmp_path / "plain", 3)
    reference = ImageFolder(str(tmp_path / "plain"))
    assert [(str(p), y) for p, y in images.samples] == reference.samples  # same order: same split indices
    assert images.image(0).mode == "RGB"

    _tree(tmp_path / "named", ["SeaLake", "AnnualCrop"], 2)  # label order from the task's folder list
    named = ImageFolderImages(tmp_path / "named", 2, folders=["SeaLake", "AnnualCrop"])
    assert named.labels() == [1, 1, 0, 0]  # AnnualCrop files come first (sorted walk), labelled 1

    _tree(tmp_path / "numbered", ["10", "2", "0", "1", "3", "4", "5", "6", "7", "8", "9"][1:], 1)
    assert sorted(set(ImageFolderImages(tmp_path / "numbered", 10).labels())) == list(range(10))

    with pytest.raises(DatasetError, match="3 class folders, the task has 4"):
        ImageFolderImages(tmp_path / "plain", 4)
    with pytest.raises(DatasetError, match="not among the task's"):
        ImageFolderImages(tmp_path / "plain", 3, folders=["x", "y", "z"])
    with pytest.raises(DatasetError, match="no such folder"):
        ImageFolderImages(tmp_path / "absent", 3)

    before = images.digest()
    (tmp_path / "plain" / "a" / "img00.png").write_bytes(b"not a png")
    changed = ImageFolderImages(tmp_path / "plain", 3)
    assert changed.digest() != before
    with pytest.raises(DatasetError, match="not a readable image"):
        changed.image(0)


def _idx(path: Path, array: np.ndarray) -> None:
    codes = {np.uint8: 0x08}
    header = struct.pack(">HBB", 0, codes[np.uint8], array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_torchvision_loader_reads_local_files_and_says_how_to_get_missing_ones(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 12)):
        _idx(raw / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    for gz in raw.glob("*.gz"):  # torchvision reads the unpacked files
        (raw / gz.name[:-3]).write_bytes(gzip.decompress(gz.read_bytes()))
    spec = task_spec("MNIST")
    train = open_images(spec.loader, tmp_path, "train", 10)
    test = open_images(spec.loader, tmp_path, "test", 10)
    assert len(train) == 30 and len(test) == 12
    assert train.labels() == [i % 10 for i in range(30)]
    assert train.image(3).mode == "RGB" and train.image(3).size == (28, 28)
    assert len(train.digest()) == 64
    with pytest.raises(DatasetError, match=r"download=True"):
        open_images(task_spec("SVHN").loader, tmp_path, "train", 10)


def test_hub_loader_reads_images_stored_as_bytes(tmp_path: Path) -> None:
    import io

    import datasets

    blobs = []
    for c in range(3):
        buffer = io.BytesIO()
        Image.new("L", (12, 12), color=40 * c).save(buffer, format="PNG")
        blobs.append(buffer.getvalue())
    split = datasets.Dataset.from_dict({"img_bytes": blobs, "labels": [0, 1, 2]})
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "fer"))
    loader = {"kind": "hf", "path": str(tmp_path / "fer"), "train": "train", "test": "test",
              "image": "img_bytes", "label": "labels"}  # fmt: skip
    images = open_images(loader, tmp_path, "test", 3)
    assert images.labels() == [0, 1, 2]
    assert images.image(2).mode == "RGB" and images.image(2).getpixel((0, 0)) == (80, 80, 80)
    with pytest.raises(DatasetError, match="no column 'image'"):
        open_images({**loader, "image": "image"}, tmp_path, "test", 3)


@pytest.mark.parametrize("model", [CLIP_TINY, "ViT-B-32"])
def test_cached_geometry_then_normalise_equals_open_clip_transform(model: str) -> None:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    visual = create_model(model).visual
    full = image_transform_v2(PreprocessCfg(**visual.preprocess_cfg), is_train=False)
    pre = Preprocess(visual)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 70, 3)).astype(np.uint8))
    cached = pre.geometry(image)
    assert cached.dtype == torch.uint8
    torch.testing.assert_close(pre.normalise(cached[None])[0], full(image), rtol=0, atol=1e-6)


# --- a tiny clip zoo through the pipeline ------------------------------------------------------------


def _tiny_clip_setup(root: Path) -> dict:
    """Random-init tiny CLIP (θ0 + two perturbed fine-tunes), fake MNIST and EuroSAT folder trees."""
    torch.manual_seed(0)
    model = create_model(CLIP_TINY)
    save_state_dict(root / "clip.safetensors", {k: v.contiguous() for k, v in model.state_dict().items()})
    visual = {k: v.contiguous() for k, v in model.visual.state_dict().items()}
    save_state_dict(root / "theta0.safetensors", visual)
    for i, task in enumerate(("MNIST", "EuroSAT")):
        g = torch.Generator().manual_seed(i + 1)
        tuned = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in visual.items()}
        save_state_dict(root / f"{task}.safetensors", tuned)
    digits = [str(d) for d in range(10)]
    _tree(root / "data" / "mnist" / "train", digits, 4)
    _tree(root / "data" / "mnist" / "test", digits, 2, seed=7)
    folders = list(task_spec("EuroSAT").folders)
    _tree(root / "data" / "EuroSAT_splits" / "train", folders, 4, seed=3)
    _tree(root / "data" / "EuroSAT_splits" / "test", folders, 2, seed=5)
    path = lambda name, file: {"kind": "path", "name": name, "path": str(root / file)}  # noqa: E731
    return {
        "preset": None, "model": CLIP_TINY, "pretrained": path("zeroshot", "theta0.safetensors"),
        "finetuned": [path("MNIST", "MNIST.safetensors"), path("EuroSAT", "EuroSAT.safetensors")],
        "text": path("clip-text", "clip.safetensors"), "store": str(root / "store"), "data_root": str(root / "data"),
        "datasets": {"MNIST": {"kind": "imagefolder", "train": "mnist/train", "test": "mnist/test"}},
        "head_cache": str(root / "heads"), "workers": 0, "device": "cpu", "batch_size": 16,
    }  # fmt: skip


def test_clip_zoo_heads_manifests_and_evaluation(tmp_path: Path) -> None:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from mergeflow.checkpoint import read_state_dict
    from mergeflow.clip.zoo import ClipEvaluator, ClipZooConfig, build_clip_zoo

    cfg = ClipZooConfig(**_tiny_clip_setup(tmp_path))
    zoo = build_clip_zoo(tmp_path / "zoo", cfg)
    assert zoo["kind"] == "clip" and list(zoo["tasks"]) == ["MNIST", "EuroSAT"]
    assert not any(t["head_cached"] for t in zoo["tasks"].values())
    manifest = json.loads(Path(zoo["tasks"]["MNIST"]["data"]).read_text())
    assert len(manifest["splits"]["validation"]["indices"]) == 4  # 10% of 40 train images
    assert len(manifest["splits"]["test"]["indices"]) == 20
    assert manifest["splits"]["validation"]["indices"] == validation_split(40)[1]

    model = create_model(CLIP_TINY)
    model.load_state_dict(read_state_dict(tmp_path / "clip.safetensors"))
    head = read_state_dict(zoo["tasks"]["EuroSAT"]["head"])["weight"]
    assert head.shape == (10, 32)
    torch.testing.assert_close(head.norm(dim=-1), torch.full((10,), float(model.logit_scale.detach().exp())))

    again = build_clip_zoo(tmp_path / "zoo", cfg)  # heads come from the cache, manifests unchanged
    assert all(t["head_cached"] for t in again["tasks"].values())
    assert again["tasks"]["MNIST"]["data_sha256"] == zoo["tasks"]["MNIST"]["data_sha256"]

    engine = ClipEvaluator(tmp_path / "zoo")
    tuned = read_state_dict(zoo["tasks"]["EuroSAT"]["model"])
    result = engine.evaluate(tuned, "test")
    # the same numbers computed directly: open_clip's full transform, the tower, the head
    model.visual.load_state_dict(tuned)
    transform = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    source = engine._source("EuroSAT", "test")
    x = torch.stack([transform(source.image(i)) for i in range(len(source))])
    with torch.no_grad():
        logits = F.normalize(model.visual(x), dim=-1) @ head.T
    labels = torch.tensor(source.labels())
    assert result["EuroSAT"]["n"] == 20
    assert result["EuroSAT"]["accuracy"] == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))
    assert result["EuroSAT"]["loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
    assert engine.evaluate(tuned, "validation")["MNIST"]["n"] == 4

    with pytest.raises(ConfigError, match="no fine-tune for tasks"):
        ClipZooConfig(**{**_tiny_clip_setup(tmp_path), "tasks": ["SVHN"]}).resolved()


@pytest.mark.slow
def test_pipeline_runs_on_a_clip_zoo(tmp_path: Path) -> None:
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows.pipeline import pipeline

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "device": "cpu",
        "zoo": {"name": "clip", "dir": str(tmp_path / "zoo"), "clip": _tiny_clip_setup(tmp_path)},
        "methods": {"weight_average": {}, "cart": {"scaling": 1.0}},
        "selection": {"grids": {"cart": {"rank_ratio": [0.25, 1.0], "scaling": [0.5, 1.0]}}},
        "adaptation": {"adamerging_cart": {"over": "cart", "rank_ratio": 0.25, "steps": 2, "batch_size": 4}},
    }))  # fmt: skip
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "results"}), prefect_harness():
        result = pipeline(params_file=str(params), track_mlflow=False)
    assert set(result["steps"].values()) == {"Completed"}
    assert "| cart |" in result["table"] and "| adamerging_cart |" in result["table"]
    report = json.loads((tmp_path / "zoo" / "report" / "results.json").read_text())
    assert report["zoo_name"] == "clip"


def test_clip_run_presets_resolve_to_the_paper_checkpoints() -> None:
    from mergeflow.clip.zoo import ClipZooConfig
    from mergeflow.config import load_config

    root = Path(__file__).resolve().parents[1]
    for n in (8, 14, 20):
        cfg = load_config(root / "params.yaml", preset=f"clip-vit-b32-{n}tasks")
        assert cfg.zoo.name == "clip" and cfg.adaptation["adamerging"].steps == 500
        model, pretrained, finetuned, text, tasks = ClipZooConfig(**cfg.zoo.settings()).resolved()
        assert model == "ViT-B-32" and tasks == TASK_SETS[n] and set(finetuned) == set(tasks)
        assert "nonlinear_zeroshot" in pretrained.filename and text.kind == "open_clip" and text.tag == "openai"


def test_zoo_check_reports_split_sizes_and_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mergeflow.cli import main

    settings = _tiny_clip_setup(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"zoo": {"name": "clip", "dir": str(tmp_path / "zoo"), "clip": settings}}))
    assert main(["-q", "zoo", "check", "--params", str(params)]) == 0
    out = capsys.readouterr().out
    assert "| MNIST | imagefolder: " in out and "| 36 | 4 | 20 |" in out  # 40 train -> 36 + 4, 20 test
    settings["datasets"] = {"MNIST": {"kind": "imagefolder", "train": "absent/train", "test": "absent/test"}}
    params.write_text(yaml.safe_dump({"zoo": {"name": "clip", "dir": str(tmp_path / "zoo"), "clip": settings}}))
    assert main(["-q", "zoo", "check", "--params", str(params)]) == 2
    assert "absent/train: no such folder" in capsys.readouterr().out
