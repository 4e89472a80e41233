"""The analyses of "Rethinking Weight-Averaged Model-merging" (Wang et al., arXiv 2411.09263) as
pure functions over state dicts and predictions.

- Weight templates: a linear classifier on raw pixels; row c of W (C × HW) reshaped to H × W and
  min-max normalised, per class, shows what the class "looks like" to the model; averaging rows
  c and d superposes the two templates.
- Weight vs. prediction/feature space, for N models fine-tuned from one θ0 on one task:
  uniform soup θ = (1/N) Σ θ_n; greedy soup (models sorted by validation accuracy, each kept only
  if the soup's validation accuracy does not drop); logit ensemble (1/N) Σ f_n(x); feature
  ensemble h((1/N) Σ φ_n(x)) with model 0's head or with the averaged head.
- Parameter scaling: every tensor of a model multiplied by M.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

State = Mapping[str, torch.Tensor]


def templates(weight: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(C × H × W) class templates: each row reshaped and min-max normalised to [0, 1]."""
    rows = weight.detach().double().reshape(weight.shape[0], *shape)
    low = rows.amin(dim=(1, 2), keepdim=True)
    high = rows.amax(dim=(1, 2), keepdim=True)
    return (rows - low) / (high - low).clamp_min(1e-12)


def averaged_template(weight: torch.Tensor, first: int, second: int, shape: tuple[int, int]) -> torch.Tensor:
    """Template of the averaged row (w_first + w_second) / 2, min-max normalised."""
    return templates(((weight[first] + weight[second]) / 2).unsqueeze(0), shape)[0]


def uniform_soup(states: Sequence[State]) -> dict[str, torch.Tensor]:
    """(1/N) Σ θ_n for floating-point tensors; other tensors must agree and are copied."""
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = (torch.stack([s[key].double() for s in states]).mean(0)).to(first.dtype)
        else:
            if any(not torch.equal(s[key], first) for s in states[1:]):
                raise ValueError(f"non-float tensor {key!r} differs between models")
            out[key] = first.clone()
    return out


def greedy_soup(
    states: Sequence[State], validation_accuracy: Callable[[State], float]
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Models sorted by their own validation accuracy (best first); each is added if the soup's
    validation accuracy does not decrease. Returns the soup and the indices it kept."""
    order = sorted(range(len(states)), key=lambda i: -validation_accuracy(states[i]))
    kept = [order[0]]
    best = validation_accuracy(states[order[0]])
    for index in order[1:]:
        candidate = uniform_soup([states[i] for i in [*kept, index]])
        score = validation_accuracy(candidate)
        if score >= best:
            kept, best = [*kept, index], score
    return uniform_soup([states[i] for i in kept]), kept


def logit_ensemble(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """(1/N) Σ f_n(x)."""
    return torch.stack(list(logits)).mean(0)


def feature_ensemble(features: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Linear head applied to the mean penultimate feature: W·(1/N) Σ φ_n(x) + b."""
    return torch.stack(list(features)).mean(0) @ weight.mT + bias


def scale_state(state: State, factor: float) -> dict[str, torch.Tensor]:
    """Every floating-point tensor multiplied by ``factor`` (integer buffers untouched)."""
    return {k: (v * factor if v.is_floating_point() else v.clone()) for k, v in state.items()}
