"""Layer-wise AdaMerging (Yang et al., ICLR 2024) and AdaMerging+CART: test-time adaptation of
one merging coefficient per (parameter tensor, task) by entropy minimisation.

θ(λ) = A + Σt clip(λ_{k,t}, lo, hi) · v_{t,k} for every tensor k, where
- ``task_arithmetic``: A = θ0 and v_t = τt = θt − θ0 on every floating-point tensor;
- ``cart``: A = θ_avg and v_t = SVD_k(θt − θ_avg) on the attention/MLP matrices (CART's
  selection); every other tensor stays at θ_avg.
λ starts at ``init`` and is trained with Adam on the sum over tasks of the mean Shannon entropy of
each task's predictions on unlabelled batches (the recipe: init 0.3, clip [0, 1], lr 1e-3,
batches of 16, ~500 steps). The model is a callback, so any architecture can be adapted.

The vectors of one tensor are stacked, V_k of shape (T, *shape), so that the sum over tasks is one
matrix-vector product λ_k · V_k and its gradient ∂L/∂λ_k = V_k · ∂L/∂θ_k another: each step reads
every vector once forward and once backward, and keeps no per-task temporaries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mergeflow.checkpoint import TensorMeta
from mergeflow.errors import ConfigError
from mergeflow.linalg import low_rank, rank_from_ratio
from mergeflow.selectors import make_selector

log = logging.getLogger("mergeflow.adamerging")


class AdaMergingParams(BaseModel):
    """Settings of one test-time adaptation (``adaptation:`` entries in params.yaml)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    over: Literal["task_arithmetic", "cart"] = Field("task_arithmetic", description="vectors the coefficients weigh")
    steps: int = Field(500, ge=0, description="Adam steps")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    init: float = Field(0.3, description="initial λ for every (tensor, task)")
    clip: tuple[float, float] = Field((0.0, 1.0), description="λ is clipped to [lo, hi] in the forward pass")
    batch_size: int = Field(16, ge=1, description="unlabelled examples per task and step")
    seed: int = 0
    rank_ratio: float = Field(0.12, ge=0.0, le=1.0, description="CART rank ratio (over: cart)")

    @model_validator(mode="after")
    def _check(self) -> AdaMergingParams:
        if self.clip[0] > self.clip[1]:
            raise ConfigError(f"adaptation clip {self.clip}: lower bound above upper bound")
        return self


Stacked = dict[str, torch.Tensor]  # key -> (T, *shape): the T tasks' vectors of one tensor


def adaptation_vectors(
    params: AdaMergingParams, base: Mapping[str, torch.Tensor], tuned: Sequence[Mapping[str, torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], Stacked]:
    """(A, V) in float32 for ``params.over``; ``V[k][t]`` is v_{t,k}, for the tensors that get coefficients."""
    floats = [k for k, v in base.items() if v.is_floating_point()]
    if params.over == "task_arithmetic":
        anchor = {k: base[k].float() for k in floats}
        return anchor, {k: torch.stack([t[k].float() - anchor[k] for t in tuned]) for k in floats}
    anchor = {k: torch.stack([t[k].float() for t in tuned]).mean(0) for k in floats}
    selector = make_selector("attn_mlp")
    selected = [k for k in floats if selector.selects(k, TensorMeta(tuple(base[k].shape), base[k].dtype))]
    stacked = {}
    for k in selected:
        rank = rank_from_ratio(params.rank_ratio, tuple(base[k].shape))
        stacked[k] = torch.stack([low_rank(t[k].float() - anchor[k], rank) for t in tuned])
    return anchor, stacked


def combine(
    anchor: Mapping[str, torch.Tensor],
    vectors: Stacked,
    coefficients: Mapping[str, torch.Tensor],
    clip: tuple[float, float],
) -> dict[str, torch.Tensor]:
    """θ_k = A_k + Σt clip(λ_{k,t}) · v_{t,k}, as one product clip(λ_k) · V_k (differentiable in λ)."""
    merged = dict(anchor)
    for key, lam in coefficients.items():
        stack = vectors[key]
        flat = stack.reshape(stack.shape[0], -1)
        merged[key] = anchor[key] + (lam.clamp(*clip).unsqueeze(0) @ flat).reshape(stack.shape[1:])
    return merged


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of softmax(logits) over the batch."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def adamerge(
    anchor: Mapping[str, torch.Tensor],
    vectors: Stacked,
    task_logits: Callable[[Mapping[str, torch.Tensor], int, torch.Generator], list[torch.Tensor]],
    params: AdaMergingParams,
    progress_every: int = 50,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[float]]:
    """Learn the coefficients; returns (merged state in float32, clipped coefficients, loss per step).

    ``task_logits(state, step, generator)`` returns one logits tensor per task for a fresh
    unlabelled batch of each task, computed with the weights ``state``.
    """
    torch.manual_seed(params.seed)
    generator = torch.Generator().manual_seed(params.seed)
    keys = sorted(vectors)
    device = next(iter(anchor.values())).device if anchor else torch.device("cpu")
    coefficients = {k: torch.full((vectors[k].shape[0],), params.init, device=device, requires_grad=True) for k in keys}
    optimizer = torch.optim.Adam(list(coefficients.values()), lr=params.lr)
    history, start = [], time.perf_counter()
    for step in range(params.steps):
        state = combine(anchor, vectors, coefficients, params.clip)
        loss = sum(entropy(logits) for logits in task_logits(state, step, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        optimizer.step()
        history.append(float(loss.detach()))  # type: ignore[union-attr]
        if progress_every and (step + 1) % progress_every == 0:
            log.info("adamerging (%s): step %d/%d, entropy %.4f, %.1f s", params.over, step + 1, params.steps,
                     history[-1], time.perf_counter() - start)  # fmt: skip
    with torch.no_grad():
        merged = {k: v.detach() for k, v in combine(anchor, vectors, coefficients, params.clip).items()}
        final = {k: v.detach().clamp(*params.clip).cpu() for k, v in coefficients.items()}
    return merged, final, history
