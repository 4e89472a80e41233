"""CART's analyses of task vectors (Choi et al., arXiv 2412.12153, section 3), as pure functions.

For a matrix key with task vectors stacked as X_t (either centred, X_t = θt − θ_avg, or uncentred,
X_t = θt − θ0), with singular values s_{t,1} ≥ s_{t,2} ≥ … and right singular vectors V_t:

- energy share of the top k:  E_t(k) = Σ_{i≤k} s_{t,i}² / Σ_i s_{t,i}²
- row-space interference:     I(k) = mean over pairs t ≠ u of ‖V_{t,k}ᵀ V_{u,k}‖_F² / k
  (0 when the top-k row spaces are orthogonal, 1 when they coincide)
- reconstruction error:       R(k) = Σ_t ‖X_t − SVD_k(X_t)‖_F² = Σ_t Σ_{i>k} s_{t,i}²
  (reported relative to Σ_t ‖X_t‖_F²)

Everything is computed in float64 from full SVDs: these are analyses, not the merge hot path.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

import torch

LAYER_TYPES = ("attn.qkv", "attn.out", "mlp.in", "mlp.out")

_TYPE_RULES = (
    (
        "attn.qkv",
        re.compile(r"(in_proj_weight|attention\.self\.(query|key|value)\.weight|self_attn\.[qkv]_proj\.weight)$"),
    ),
    ("attn.out", re.compile(r"(attn\.out_proj\.weight|attention\.output\.dense\.weight|self_attn\.out_proj\.weight)$")),
    ("mlp.in", re.compile(r"(mlp\.c_fc\.weight|intermediate\.dense\.weight|mlp\.fc1\.weight)$")),
    ("mlp.out", re.compile(r"(mlp\.c_proj\.weight|layer\.\d+\.output\.dense\.weight|mlp\.fc2\.weight)$")),
)


def layer_type(key: str) -> str | None:
    """Which transformer-block matrix ``key`` is (open_clip, HF CLIP or HF BERT names), or None."""
    for name, rule in _TYPE_RULES:
        if rule.search(key):
            return name
    return None


def task_vectors(base: torch.Tensor, tuned: Sequence[torch.Tensor], centred: bool) -> torch.Tensor:
    """Stacked X_t in float64: θt − θ_avg (centred) or θt − θ0."""
    stack = torch.stack([t.double() for t in tuned])
    anchor = stack.mean(0) if centred else base.double()
    return stack - anchor


def singular_values(vectors: torch.Tensor) -> torch.Tensor:
    """(T × min(m, n)) singular values of each stacked matrix, descending."""
    return torch.linalg.svdvals(vectors)


def energy_share(values: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """(T × len(ks)) share of squared singular values in the top k."""
    energy = values.square()
    total = energy.sum(-1, keepdim=True).clamp_min(1e-300)
    cumulative = energy.cumsum(-1) / total
    index = torch.tensor([min(max(k, 1), values.shape[-1]) - 1 for k in ks])
    return cumulative[..., index]


def reconstruction_error(values: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """(len(ks),) Σ_t ‖X_t − SVD_k(X_t)‖_F² relative to Σ_t ‖X_t‖_F²."""
    energy = values.square()
    total = energy.sum().clamp_min(1e-300)
    return torch.stack([energy[:, k:].sum() / total for k in ks])


def right_singular_vectors(vectors: torch.Tensor, k_max: int) -> list[torch.Tensor]:
    """Top-k_max right singular vectors (k_max × n, orthonormal rows) of each X_t."""
    return [torch.linalg.svd(x, full_matrices=False).Vh[:k_max] for x in vectors]


def interference(rows: Sequence[torch.Tensor], ks: Sequence[int]) -> torch.Tensor:
    """(len(ks),) mean over task pairs of ‖V_{t,k} V_{u,k}ᵀ‖_F² / k."""
    pairs = list(itertools.combinations(range(len(rows)), 2))
    if not pairs:
        return torch.zeros(len(ks), dtype=torch.float64)
    out = []
    for k in ks:
        overlaps = [(rows[t][:k] @ rows[u][:k].mT).square().sum() / k for t, u in pairs]
        out.append(torch.stack(overlaps).mean())
    return torch.stack(out)
