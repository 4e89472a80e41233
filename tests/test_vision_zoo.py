"""The vision-tiny zoo: packaged image data, a tiny open_clip tower, probe heads, fine-tunes,
merges and AdaMerging through the same report machinery as the text zoo (tiny settings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergeflow.adamerging import AdaMergingParams
from mergeflow.checkpoint import read_state_dict
from mergeflow.zoo.registry import build_zoo, evaluate_checkpoint
from mergeflow.zoo.vision_data import EMOJI_FONT, clipart, digits, emoji_groups, mnist5k
from mergeflow.zoo.vision_zoo import VisionZooConfig


def test_packaged_image_sets() -> None:
    for data, n, classes in ((mnist5k(), 5000, 10), (digits(), 1797, 10)):
        assert data.images.shape == (n, 28, 28) and data.images.dtype == torch.uint8
        assert len(data.classes) == classes and int(data.labels.max()) == classes - 1
        assert data.images.float().mean() > 10  # not blank


@pytest.mark.skipif(not EMOJI_FONT.exists(), reason="fonts-noto-color-emoji not installed")
def test_emoji_are_rendered_with_their_groups() -> None:
    data = emoji_groups()
    assert len(data.labels) > 1000 and len(data.classes) == 9 and "smileys and emotion" in data.classes
    inked = (data.images > 30).float().mean(dim=(1, 2))
    assert (inked > 0.05).float().mean() > 0.95  # almost every glyph drew something


def test_clipart_reads_a_folder_tree(tmp_path: Path) -> None:
    from PIL import Image, ImageDraw

    for folder, count in (("animals", 5), ("food", 2), ("tools", 4), ("empty", 0)):
        (tmp_path / folder / "sub").mkdir(parents=True)
        for i in range(count):
            image = Image.new("RGBA", (60, 40), (0, 0, 0, 0))
            ImageDraw.Draw(image).ellipse((5, 5, 20 + 5 * i, 35), fill=(200, 30, 30, 255))
            image.save(tmp_path / folder / "sub" / f"{i}.png")
    (tmp_path / "food" / "broken.png").write_bytes(b"not a png")
    Image.new("L", (5000, 4000)).save(tmp_path / "tools" / "sub" / "0-huge.png")  # skipped undecoded
    data = clipart(tmp_path, categories=2, per_category=4)
    assert data.classes == ("animals", "tools")  # the two largest folders, in name order
    assert data.labels.tolist() == [0] * 4 + [1] * 4 and data.images.shape == (8, 28, 28)
    assert all(int(img.max()) > 100 for img in data.images)  # the drawing shows (light on dark)


def test_tiny_vision_zoo_fine_tunes_merges_and_adapts(tmp_path: Path) -> None:
    from mergeflow.zoo.job import zoo_report

    cfg = VisionZooConfig(tasks=("mnist5k", "digits"), pretrain_examples=512, pretrain_epochs=1.0, train=256,
                          validation=64, test=128, epochs=8.0, lr=5e-4)  # fmt: skip
    zoo = build_zoo("vision-tiny", tmp_path / "zoo", cfg.model_dump(mode="json"))
    assert zoo["kind"] == "vision" and "not a foundation model" in zoo["note"]
    theta0 = read_state_dict(zoo["theta0"]["file"])
    assert any("attn.in_proj_weight" in k for k in theta0)  # the open_clip layout, merged by attn_mlp
    for task, info in zoo["tasks"].items():
        assert set(read_state_dict(info["model"])) == set(theta0)
        own = evaluate_checkpoint(tmp_path / "zoo", info["model"], "train")[task]["accuracy"]
        zero = evaluate_checkpoint(tmp_path / "zoo", zoo["theta0"]["file"], "train")[task]["accuracy"]
        assert own > zero + 0.03, task  # fine-tuning improves the task it trained on
    again = build_zoo("vision-tiny", tmp_path / "zoo", cfg.model_dump(mode="json"))
    assert again == zoo  # resumed: nothing retrained, same description

    methods = {"weight_average": {}, "cart": {}}
    grids = {"cart": {"rank_ratio": [0.1, 0.5], "scaling": [1.0, 2.0]}}
    adaptation = {"adamerging": AdaMergingParams(steps=3, batch_size=8)}
    report = zoo_report(tmp_path / "zoo", methods, grids, tmp_path / "report", device="cpu", adaptation=adaptation)
    rows = {r["method"]: r for r in report["rows"]}
    assert {"weight_average", "cart", "adamerging", "zero-shot (θ0)"} <= set(rows)
    assert len(report["sweeps"]["cart"]) == 4 and len(report["adaptation"]["adamerging"]["history"]) == 3
    assert "not a foundation model" in (tmp_path / "report" / "report.md").read_text()
    assert json.loads((tmp_path / "report" / "results.json").read_text())["zoo_name"] == "vision-tiny"
