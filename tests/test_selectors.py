"""Matrix selectors on the real key layouts of open_clip, HF CLIP and HF BERT."""

from __future__ import annotations

import re
from collections.abc import Sequence

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
    others = [
        "vision_model.encoder.layers.0.self_attn.q_proj.bias",
        "vision_model.post_layernorm.weight",
        "vision_model.embeddings.position_embedding.weight",
        "visual_projection.weight",
    ]
    layout = {
        k: TensorMeta((4, 4) if k.endswith("weight") and "layernorm" not in k else (4,), f32) for k in names + others
    }
    assert make_selector("attn_mlp").select(layout) == names
    assert detect_layout(list(layout)) == "hf_clip"


def test_layout_detection(vit_b32_visual) -> None:
    assert detect_layout(list(vit_b32_visual)) == "open_clip"
    assert detect_layout(list(bert_layout(8, 1, 16))) == "hf_bert"
    assert detect_layout(["a.weight"]) == "unknown"


# --- decoder, encoder-decoder and vision families, on the key names transformers gives them -------

transformers = pytest.importorskip("transformers")

_TINY = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=32)


def _tiny_configs() -> dict[str, object]:
    t = transformers
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=8, patch_size=4
    )
    return {
        "llama": t.LlamaConfig(**_TINY, num_key_value_heads=1),
        "mistral": t.MistralConfig(**_TINY, num_key_value_heads=1),
        "qwen2": t.Qwen2Config(**_TINY, num_key_value_heads=1),
        "gemma": t.GemmaConfig(**_TINY, num_key_value_heads=1, head_dim=8),
        "phi3": t.Phi3Config(**_TINY, num_key_value_heads=2, pad_token_id=0),
        "gpt2": t.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=32, n_positions=16),
        "gpt_neox": t.GPTNeoXConfig(**_TINY),
        "t5": t.T5Config(d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8, vocab_size=32),
        "vit": t.ViTConfig(**vision),
        "dinov2": t.Dinov2Config(**{k: v for k, v in vision.items() if k != "intermediate_size"}, mlp_ratio=2),
        "clip": t.CLIPConfig(
            text_config=dict(_TINY, max_position_embeddings=16), vision_config=vision, projection_dim=8
        ),
        "bert": t.BertConfig(**_TINY, max_position_embeddings=16),
    }


@pytest.fixture(scope="module")
def family_layouts() -> dict[str, dict[str, TensorMeta]]:
    layouts = {}
    for name, config in _tiny_configs().items():
        model = transformers.AutoModel.from_config(config)
        layouts[name] = _layout(model.state_dict())
    return layouts


def _names(template: str, parts: Sequence[str], layers: int = 2) -> set[str]:
    """``template`` filled with every layer index ``i`` and every part ``p``."""
    return {template.format(i=i, p=p) for i in range(layers) for p in parts}


_LLAMA = "self_attn.q_proj self_attn.k_proj self_attn.v_proj self_attn.o_proj mlp.gate_proj mlp.up_proj mlp.down_proj"
_PHI3 = "self_attn.qkv_proj self_attn.o_proj mlp.gate_up_proj mlp.down_proj"
_NEOX = "attention.query_key_value attention.dense mlp.dense_h_to_4h mlp.dense_4h_to_h"
_T5_ENC = (
    "0.SelfAttention.q 0.SelfAttention.k 0.SelfAttention.v 0.SelfAttention.o 1.DenseReluDense.wi 1.DenseReluDense.wo"
)
_T5_DEC = (
    "0.SelfAttention.q 0.SelfAttention.k 0.SelfAttention.v 0.SelfAttention.o 1.EncDecAttention.q 1.EncDecAttention.k "
    "1.EncDecAttention.v 1.EncDecAttention.o 2.DenseReluDense.wi 2.DenseReluDense.wo"
)
_VIT5 = "attention.q_proj attention.k_proj attention.v_proj attention.o_proj mlp.fc1 mlp.fc2"
_CLIP = "self_attn.q_proj self_attn.k_proj self_attn.v_proj self_attn.out_proj mlp.fc1 mlp.fc2"
_BERT = (
    "attention.self.query attention.self.key attention.self.value attention.output.dense intermediate.dense "
    "output.dense"
)
# family -> (detected layout, exactly the keys attn_mlp selects)
EXPECTED: dict[str, tuple[str, set[str]]] = {
    "llama": ("llama", _names("layers.{i}.{p}.weight", _LLAMA.split())),
    "mistral": ("llama", _names("layers.{i}.{p}.weight", _LLAMA.split())),
    "qwen2": ("llama", _names("layers.{i}.{p}.weight", _LLAMA.split())),
    "gemma": ("llama", _names("layers.{i}.{p}.weight", _LLAMA.split())),
    "phi3": ("phi3", _names("layers.{i}.{p}.weight", _PHI3.split())),
    "gpt2": ("gpt2", _names("h.{i}.{p}.weight", "attn.c_attn attn.c_proj mlp.c_fc mlp.c_proj".split())),
    "gpt_neox": ("gpt_neox", _names("layers.{i}.{p}.weight", _NEOX.split())),
    "t5": (
        "t5",
        _names("encoder.block.{i}.layer.{p}.weight", _T5_ENC.split())
        | _names("decoder.block.{i}.layer.{p}.weight", _T5_DEC.split()),
    ),
    "vit": ("hf_vit", _names("layers.{i}.{p}.weight", _VIT5.split())),
    "dinov2": ("hf_vit", _names("encoder.layer.{i}.{p}.weight", _VIT5.split())),
    "clip": (
        "hf_clip",
        _names("text_model.encoder.layers.{i}.{p}.weight", _CLIP.split())
        | _names("vision_model.encoder.layers.{i}.{p}.weight", _CLIP.split()),
    ),
    "bert": ("hf_bert", _names("encoder.layer.{i}.{p}.weight", _BERT.split())),
}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_attn_mlp_selects_exactly_the_block_matrices(family_layouts, family: str) -> None:
    layout = family_layouts[family]
    want_layout, want = EXPECTED[family]
    assert set(make_selector("attn_mlp").select(layout)) == want
    assert detect_layout(list(layout)) == want_layout
    model_type = _tiny_configs()[family].model_type  # type: ignore[attr-defined]
    assert detect_layout(list(layout), model_type) == want_layout
    # what is left out: embeddings, heads, norms, relative position tables, poolers (all 2-D ones named)
    left = {k for k, m in layout.items() if len(m.shape) == 2} - want
    assert not any(
        re.search(r"(q|k|v|o|qkv|gate|up|down|gate_up)_proj\.weight$|c_attn|c_fc|query_key_value|DenseReluDense", k)
        for k in left
    ), left


def test_prefixed_causal_lm_keys(family_layouts) -> None:
    """A CausalLM checkpoint prefixes ``model.`` and adds ``lm_head.weight``: the head is no block matrix."""
    layout = {f"model.{k}": m for k, m in family_layouts["llama"].items()}
    layout["lm_head.weight"] = TensorMeta((32, 16), torch.float32)
    chosen = set(make_selector("attn_mlp").select(layout))
    assert chosen == {f"model.{k}" for k in EXPECTED["llama"][1]}


def test_vit_as_transformers_4_saved_it() -> None:
    """Hub ViT/DINOv2 checkpoints keep the transformers 4 names (``attention.attention.query``)."""
    f32 = torch.float32
    block = [
        f"vit.encoder.layer.0.{p}.weight"
        for p in (
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        )
    ]
    others = [
        "vit.embeddings.patch_embeddings.projection.weight",
        "vit.pooler.dense.weight",
        "classifier.weight",
        "vit.encoder.layer.0.layernorm_before.weight",
        "vit.encoder.layer.0.attention.attention.query.bias",
    ]
    layout = {
        k: TensorMeta((4, 4) if k.endswith("weight") and "layernorm" not in k else (4,), f32) for k in block + others
    }
    layout["vit.embeddings.patch_embeddings.projection.weight"] = TensorMeta((4, 3, 2, 2), f32)
    assert make_selector("attn_mlp").select(layout) == block
    assert detect_layout(list(layout)) == "hf_vit"


def test_include_globs_are_an_explicit_selection(family_layouts) -> None:
    layout = family_layouts["gpt_neox"]
    chosen = make_selector("attn_mlp", exclude=["layers.1.*"], include=["*.query_key_value.weight", "embed_in.*"])
    assert set(chosen.select(layout)) == {"layers.0.attention.query_key_value.weight", "embed_in.weight"}
    assert chosen.describe()["include"] == ["*.query_key_value.weight", "embed_in.*"]


def test_unknown_layout_error_says_what_was_found_and_how_to_select() -> None:
    from mergeflow.errors import ConfigError
    from mergeflow.methods import MergeContext, get_method, parse_params

    f32 = torch.float32
    layout = {f"trunk.stage{i}.mix.weight": TensorMeta((4, 4), f32) for i in range(6)}
    layout["trunk.scale"] = TensorMeta((4,), f32)
    assert detect_layout(list(layout)) == "unknown"
    ctx = MergeContext(2, layout, torch.device("cpu"), f32, (0, 1))
    with pytest.raises(ConfigError) as caught:
        get_method("cart").merger(parse_params("cart", {}), ctx)
    text = str(caught.value)
    assert "\n" not in text and "layout: unknown" in text and "found 6 2-D float tensor(s)" in text
    assert "trunk.stage0.mix.weight, trunk.stage1.mix.weight" in text and "include" in text
    merger = get_method("cart").merger(parse_params("cart", {"include": ("trunk.stage[01].*",)}), ctx)
    assert merger.selected == {"trunk.stage0.mix.weight", "trunk.stage1.mix.weight"}
