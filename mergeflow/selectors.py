"""Named rules that pick which 2-D weight matrices a low-rank method treats as matrices.

``attn_mlp``: the attention and MLP weight matrices inside transformer blocks.
  - open_clip / HF CLIP (the official CART rule): the key contains ``attn`` or ``mlp`` and contains
    neither ``ln`` nor ``bias`` (open_clip: ``attn.in_proj_weight`` fused q/k/v, ``attn.out_proj.weight``,
    ``mlp.c_fc.weight``, ``mlp.c_proj.weight``; HF CLIP: ``self_attn.{q,k,v,out}_proj.weight``,
    ``mlp.fc1.weight``, ``mlp.fc2.weight``);
  - HF BERT: ``attention.self.{query,key,value}``, ``attention.output.dense``, ``intermediate.dense``
    and ``output.dense`` weights of ``encoder.layer.N``.
``all_2d``: every 2-D floating-point tensor.
Both drop keys matching any ``exclude`` glob (fnmatch syntax, e.g. ``*positional_embedding``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from mergeflow.checkpoint import TensorMeta
from mergeflow.errors import ConfigError

_BERT_BLOCK_MATRIX = re.compile(
    r"(^|\.)layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)\.weight$"
)


def is_attn_mlp(key: str) -> bool:
    """Whether ``key`` names an attention/MLP weight inside a transformer block (either layout)."""
    if ("attn" in key or "mlp" in key) and "ln" not in key and "bias" not in key:
        return True
    return bool(_BERT_BLOCK_MATRIX.search(key))


_RULES: dict[str, Callable[[str], bool]] = {
    "attn_mlp": is_attn_mlp,
    "all_2d": lambda key: True,
}
SELECTOR_NAMES: tuple[str, ...] = tuple(_RULES)


@dataclass(frozen=True)
class MatrixSelector:
    """A named rule plus exclude globs; only 2-D floating-point tensors can ever be selected."""

    name: str
    exclude: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.name not in _RULES:
            raise ConfigError(f"unknown matrix selector {self.name!r}; known: {', '.join(SELECTOR_NAMES)}")

    def selects(self, key: str, meta: TensorMeta) -> bool:
        if len(meta.shape) != 2 or not meta.is_float:
            return False
        if any(fnmatchcase(key, pattern) for pattern in self.exclude):
            return False
        return _RULES[self.name](key)

    def select(self, layout: Mapping[str, TensorMeta]) -> list[str]:
        return [key for key, meta in layout.items() if self.selects(key, meta)]

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "exclude": list(self.exclude)}


def make_selector(name: str, exclude: Iterable[str] | None = None) -> MatrixSelector:
    return MatrixSelector(name, tuple(exclude or ()))


def detect_layout(keys: Sequence[str]) -> str:
    """Best guess of a state dict's layout: ``open_clip``, ``hf_clip``, ``hf_bert`` or ``unknown``."""
    joined = "\n".join(keys)
    if "attn.in_proj_weight" in joined or ".resblocks." in joined:
        return "open_clip"
    if "self_attn.q_proj" in joined:
        return "hf_clip"
    if "attention.self.query" in joined:
        return "hf_bert"
    return "unknown"
