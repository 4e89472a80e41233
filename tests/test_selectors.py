"""Matrix selectors on the real key layouts of open_clip, HF CLIP and HF BERT."""

from __future__ import annotations

import open_clip
import pytest
import torch

from mergeflow.checkpoint import TensorMeta
from mergeflow.selectors import detect_layout, make_selector
from mergeflow.synthetic import bert_layout, open_clip_visual_layout


def _layout(sd: dict[str, torch.Tensor]) -> dict[str, TensorMeta]:
    return {k: TensorMeta(tuple(v.shape), v.dtype) for k, v in sd.items()}


@pytest.fixture(scope="module")
def vit_b32_visual() -> dict[str, TensorMeta]:
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    return _layout(model.visual.state_dict())


def test_synthetic_layout_is_open_clips_vit_b32(vit_b32_visual) -> None:
    ours = open_clip_visual_layout(width=768, layers=12, patch=32, image=224, output_dim=512)
    assert ours == vit_b32_visual


def test_attn_mlp_on_open_clip_picks_the_48_block_matrices(vit_b32_visual) -> None:
    chosen = make_selector("attn_mlp").select(vit_b32_visual)
    assert len(chosen) == 48
    suffixes = {k.split(".", 3)[-1] for k in chosen}
    assert suffixes == {"attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"}
    assert not {"positional_embedding", "proj", "conv1.weight", "class_embedding"} & set(chosen)


def test_attn_mlp_with_prefix_and_exclude(vit_b32_visual) -> None:
    prefixed = {f"model.visual.{k}": v for k, v in vit_b32_visual.items()}
    chosen = make_selector("attn_mlp", ["*resblocks.11.*", "*c_proj*"]).select(prefixed)
    assert len(chosen) == 11 * 3 and all(k.startswith("model.visual.") for k in chosen)


def test_all_2d_includes_embeddings_and_projection(vit_b32_visual) -> None:
    chosen = set(make_selector("all_2d").select(vit_b32_visual))
    assert {"positional_embedding", "proj"} <= chosen and "conv1.weight" not in chosen
    assert len(chosen) == 48 + 2


def test_attn_mlp_on_hf_bert() -> None:
    layout = bert_layout(hidden=8, layers=3, intermediate=16)
    chosen = make_selector("attn_mlp").select(layout)
    assert len(chosen) == 6 * 3
    assert "pooler.dense.weight" not in chosen and "embeddings.word_embeddings.weight" not in chosen
    assert "encoder.layer.2.output.dense.weight" in chosen and "encoder.layer.0.attention.self.key.weight" in chosen


def test_attn_mlp_on_hf_clip_vision_names() -> None:
    f32 = torch.float32
    names = [
        "vision_model.encoder.layers.0.self_attn.q_proj.weight",
        "vision_model.encoder.layers.0.self_attn.k_proj.weight",
        "vision_model.encoder.layers.0.self_attn.v_proj.weight",
        "vision_model.encoder.layers.0.self_attn.out_proj.weight",
        "vision_model.encoder.layers.0.mlp.fc1.weight",
        "vision_model.encoder.layers.0.mlp.fc2.weight",
    ]
    others = ["vision_model.encoder.layers.0.self_attn.q_proj.bias", "vision_model.post_layernorm.weight",
              "vision_model.embeddings.position_embedding.weight", "visual_projection.weight"]  # fmt: skip
    layout = {
        k: TensorMeta((4, 4) if k.endswith("weight") and "layernorm" not in k else (4,), f32) for k in names + others
    }
    assert make_selector("attn_mlp").select(layout) == names
    assert detect_layout(list(layout)) == "hf_clip"


def test_layout_detection(vit_b32_visual) -> None:
    assert detect_layout(list(vit_b32_visual)) == "open_clip"
    assert detect_layout(list(bert_layout(8, 1, 16))) == "hf_bert"
    assert detect_layout(["a.weight"]) == "unknown"
