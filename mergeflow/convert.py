"""Layout conversions between HF-transformers CLIP vision towers and open_clip image towers.

open_clip fuses q/k/v into one ``attn.in_proj_weight`` (3d × d) and stores the output projection
as ``proj`` (d × out); HF keeps ``q_proj``/``k_proj``/``v_proj`` and ``visual_projection.weight``
(out × d). The mapping is a pure re-arrangement of the same numbers, so features are identical
(tests/test_acquire.py checks this on a tiny model).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from mergeflow.errors import CheckpointError

_HF = "vision_model."
_SIMPLE = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
}
_BLOCK = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_IGNORED = re.compile(r"^(text_model\.|text_projection\.|logit_scale$|vision_model\.embeddings\.position_ids$)")


def select_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under ``prefix``, with the prefix removed (e.g. ``model.visual.`` of an ImageEncoder)."""
    chosen = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not chosen:
        raise CheckpointError(f"no key starts with {prefix!r}")
    return chosen


def _layers(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def hf_clip_vision_to_open_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``CLIPVisionModelWithProjection``/``CLIPModel`` weights -> open_clip ``visual`` state dict."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointError(f"HF CLIP vision weights lack {key!r}")
        used.add(key)
        return state[key]

    for hf, oc in _SIMPLE.items():
        out[oc] = take(_HF + hf)
    for i in range(_layers(state, r"^vision_model\.encoder\.layers\.(\d+)\.")):
        src, dst = f"{_HF}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([take(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"])
            for hf, oc in _BLOCK.items():
                out[f"{dst}{oc}.{kind}"] = take(f"{src}{hf}.{kind}")
    if "visual_projection.weight" in state:
        out["proj"] = take("visual_projection.weight").T.contiguous()
    left = {k for k in state if k not in used and not _IGNORED.match(k)}
    if left:
        raise CheckpointError(f"HF CLIP vision weights have unmapped keys, e.g. {sorted(left)[:3]}")
    return out


def open_clip_to_hf_clip_vision(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip ``visual`` state dict -> HF ``CLIPVisionModelWithProjection`` weights (inverse of above)."""
    out = {_HF + hf: state[oc] for hf, oc in _SIMPLE.items()}
    for i in range(_layers(state, r"^transformer\.resblocks\.(\d+)\.")):
        src, dst = f"transformer.resblocks.{i}.", f"{_HF}encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = state[f"{src}attn.in_proj_{kind}"].chunk(3)
            for name, part in zip("qkv", (q, k, v), strict=True):
                out[f"{dst}self_attn.{name}_proj.{kind}"] = part.contiguous()
            for hf, oc in _BLOCK.items():
                out[f"{dst}{hf}.{kind}"] = state[f"{src}{oc}.{kind}"]
    if "proj" in state:
        out["visual_projection.weight"] = state["proj"].T.contiguous()
    return out
