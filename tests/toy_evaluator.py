"""A user's own evaluator, as ``mergeflow adapt --evaluator toy_evaluator:make`` loads it: a small
linear classifier and two tasks of unlabelled Gaussian inputs (no labels anywhere)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

DIM, CLASSES = 6, 3


class ToyEvaluator:
    def __init__(self, shift: float = 1.0):
        self.tasks = ["left", "right"]
        self.model = torch.nn.Linear(DIM, CLASSES)
        self.shift = shift

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def sample_unlabelled(self, task: str, count: int, generator: torch.Generator) -> torch.Tensor:
        sign = -1.0 if task == "left" else 1.0
        return torch.randn(count, DIM, generator=generator) + sign * self.shift

    def logits_with(self, task: str, inputs: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(self.model, dict(params), (inputs,))


def make(shift: float = 1.0) -> ToyEvaluator:
    return ToyEvaluator(float(shift))


def write_checkpoints(folder) -> tuple[str, list[str]]:
    """θ0 and two fine-tunes of the toy classifier as safetensors files."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {"weight": torch.randn(CLASSES, DIM, generator=g) * 0.1, "bias": torch.zeros(CLASSES)}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(base, str(folder / "theta0.safetensors"))
    paths = []
    for i in range(2):
        tuned = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(tuned, str(folder / f"ft{i}.safetensors"))
        paths.append(str(folder / f"ft{i}.safetensors"))
    return str(folder / "theta0.safetensors"), paths
