"""Named rules that pick which 2-D weight matrices a low-rank method treats as matrices.

``attn_mlp``: the attention and MLP weight matrices inside transformer blocks. A key is selected when
it matches the block-matrix pattern of any family below (the rule looks at the key alone, so a prefix
such as ``model.`` or ``vision_model.`` does not matter); embeddings, output heads, norms, biases,
poolers and relative-position tables are never selected.

  - open_clip / HF CLIP / GPT-2 / the Llama family (the official CART rule): the key contains
    ``attn`` or ``mlp`` and contains neither ``ln`` nor ``bias`` (open_clip: ``attn.in_proj_weight``
    fused q/k/v, ``attn.out_proj.weight``, ``mlp.c_fc.weight``, ``mlp.c_proj.weight``; HF CLIP:
    ``self_attn.{q,k,v,out}_proj.weight``, ``mlp.fc1.weight``, ``mlp.fc2.weight``; GPT-2:
    ``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj`` (Conv1D weights, stored
    transposed, 2-D all the same); Llama/Mistral/Qwen2/Gemma: ``self_attn.{q,k,v,o}_proj``,
    ``mlp.{gate,up,down}_proj``; Phi-3: ``self_attn.qkv_proj``, ``self_attn.o_proj``,
    ``mlp.gate_up_proj``, ``mlp.down_proj``);
  - HF BERT: ``attention.self.{query,key,value}``, ``attention.output.dense``, ``intermediate.dense``
    and ``output.dense`` weights of ``layer.N``;
  - HF ViT / DINOv2: ``attention.attention.{query,key,value}`` (as saved by transformers 4) or
    ``attention.{q,k,v,o}_proj`` (transformers 5), ``attention.output.dense``, ``intermediate.dense``,
    ``output.dense`` of ``layer.N``/``layers.N``, and ``mlp.fc1``/``mlp.fc2`` (DINOv2);
  - GPT-NeoX: ``attention.query_key_value``, ``attention.dense``, ``mlp.dense_h_to_4h``,
    ``mlp.dense_4h_to_h`` of ``layers.N``;
  - T5: ``SelfAttention.{q,k,v,o}``, ``EncDecAttention.{q,k,v,o}`` and ``DenseReluDense.{wi,wi_0,wi_1,wo}``
    of ``block.N.layer.M`` (``relative_attention_bias`` is not a block matrix).

``all_2d``: every 2-D floating-point tensor.

``include`` globs (fnmatch syntax), when given, are an explicit selection: the 2-D floating-point
keys matching any of them, the named rule aside. ``exclude`` globs (e.g. ``*positional_embedding``)
drop keys from either.

:func:`detect_layout` names the family of a state dict from its keys, or from ``config.json``'s
``model_type`` when that is known; it is recorded in outputs and named in errors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from mergeflow.checkpoint import TensorMeta
from mergeflow.errors import ConfigError

_BLOCK_MATRICES = re.compile(
    r"(^|\.)layers?\.\d+\.("
    r"attention\.self\.(query|key|value)"  # BERT
    r"|attention\.attention\.(query|key|value)"  # ViT / DINOv2 as transformers 4 saves them
    r"|attention\.(q_proj|k_proj|v_proj|o_proj)"  # ViT / DINOv2 in transformers 5
    r"|attention\.output\.dense|intermediate\.dense|output\.dense"  # BERT, ViT, DINOv2
    r"|attention\.(query_key_value|dense)"  # GPT-NeoX
    r")\.weight$"
)
_T5_MATRICES = re.compile(
    r"(^|\.)block\.\d+\.layer\.\d+\.((SelfAttention|EncDecAttention)\.[qkvo]|DenseReluDense\.(wi|wi_0|wi_1|wo))\.weight$"
)


def is_attn_mlp(key: str) -> bool:
    """Whether ``key`` names an attention/MLP weight inside a transformer block (any known family)."""
    if ("attn" in key or "mlp" in key) and "ln" not in key and "bias" not in key:
        return True
    return bool(_BLOCK_MATRICES.search(key) or _T5_MATRICES.search(key))


_RULES: dict[str, Callable[[str], bool]] = {
    "attn_mlp": is_attn_mlp,
    "all_2d": lambda key: True,
}
SELECTOR_NAMES: tuple[str, ...] = tuple(_RULES)


@dataclass(frozen=True)
class MatrixSelector:
    """A named rule, or explicit include globs, minus exclude globs; only 2-D floating-point tensors
    can ever be selected."""

    name: str
    exclude: tuple[str, ...] = field(default=())
    include: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.name not in _RULES:
            raise ConfigError(f"unknown matrix selector {self.name!r}; known: {', '.join(SELECTOR_NAMES)}")

    def selects(self, key: str, meta: TensorMeta) -> bool:
        if len(meta.shape) != 2 or not meta.is_float:
            return False
        if any(fnmatchcase(key, pattern) for pattern in self.exclude):
            return False
        if self.include:
            return any(fnmatchcase(key, pattern) for pattern in self.include)
        return _RULES[self.name](key)

    def select(self, layout: Mapping[str, TensorMeta]) -> list[str]:
        return [key for key, meta in layout.items() if self.selects(key, meta)]

    def describe(self) -> dict[str, object]:
        described: dict[str, object] = {"name": self.name, "exclude": list(self.exclude)}
        if self.include:
            described["include"] = list(self.include)
        return described


def make_selector(
    name: str, exclude: Iterable[str] | None = None, include: Iterable[str] | None = None
) -> MatrixSelector:
    return MatrixSelector(name, tuple(exclude or ()), tuple(include or ()))


# Layout families, most specific first: (name, substrings of which one must occur in some key).
_FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("open_clip", ("attn.in_proj_weight", ".resblocks.")),
    ("t5", ("SelfAttention.q.weight", "DenseReluDense.")),
    ("gpt_neox", ("attention.query_key_value.",)),
    ("gpt2", ("attn.c_attn.",)),
    ("phi3", ("self_attn.qkv_proj.", "mlp.gate_up_proj.")),
    ("llama", ("mlp.gate_proj.",)),
    ("hf_clip", ("self_attn.q_proj",)),
    ("hf_vit", ("attention.attention.query.", ".attention.q_proj.")),
    ("hf_bert", ("attention.self.query",)),
)
LAYOUT_NAMES: tuple[str, ...] = (*(name for name, _ in _FAMILIES), "unknown")
# config.json model_type -> family, for the types whose keys are known to follow one.
MODEL_TYPES: dict[str, str] = {
    "llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "llama", "qwen3": "llama",
    "gemma": "llama", "gemma2": "llama", "phi3": "phi3", "gpt2": "gpt2", "gpt_neox": "gpt_neox",
    "t5": "t5", "mt5": "t5", "umt5": "t5", "vit": "hf_vit", "dinov2": "hf_vit", "clip": "hf_clip",
    "clip_vision_model": "hf_clip", "clip_text_model": "hf_clip", "bert": "hf_bert", "roberta": "hf_bert",
}  # fmt: skip


def detect_layout(keys: Sequence[str], model_type: str | None = None) -> str:
    """The layout family of a state dict (one of :data:`LAYOUT_NAMES`).

    ``model_type`` (``config.json``'s, when the checkpoint has one) decides when it is one of
    :data:`MODEL_TYPES`; otherwise the keys do.
    """
    if model_type is not None and model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    joined = "\n".join(keys)
    for name, markers in _FAMILIES:
        if any(marker in joined for marker in markers):
            return name
    return "unknown"


def explain_empty_selection(selector: MatrixSelector, layout: Mapping[str, TensorMeta], examples: int = 4) -> str:
    """The one-line error for a selector that picks no matrix: what was found and how to select explicitly."""
    floats = [key for key, meta in layout.items() if meta.is_float]
    matrices = sorted(key for key, meta in layout.items() if meta.is_float and len(meta.shape) == 2)
    rule = f"include {list(selector.include)}" if selector.include else f"{selector.name!r}"
    shown = ", ".join(matrices[:examples]) + (", ..." if len(matrices) > examples else "")
    found = f"{len(matrices)} 2-D float tensor(s): {shown}" if matrices else "no 2-D float tensor"
    return (
        f"the matrix selector {rule} (exclude {list(selector.exclude)}) matches none of the {len(floats)} float "
        f"tensors (layout: {detect_layout(list(layout))}; found {found}), so no matrix would be factorized; "
        "select explicitly with include globs (e.g. --set 'include=[\"*.attn.*.weight\"]', fnmatch syntax), "
        "pass selector=all_2d, or adjust exclude"
    )
