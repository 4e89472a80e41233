"""The evaluator protocol every zoo implements, and the scoring rule they share.

:class:`Evaluator` takes a state dict, evaluates a split and returns per-task metrics (top-1
accuracy, mean cross-entropy, count); it also hands out unlabelled batches for adaptation. It knows
nothing of any particular zoo: the zoos implement it (:mod:`mergeflow.zoo.registry` lists them).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]  # tokenised inputs, labels


def top1_and_loss(scored: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Top-1 accuracy, mean cross-entropy and count over (logits, labels) batches."""
    correct, loss, n = 0, 0.0, 0
    for logits, labels in scored:
        labels = labels.to(logits.device)
        loss += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        n += len(labels)
    return {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1), "n": n}


class Evaluator:
    """What every evaluator provides: put a state dict in, score every task's split without gradients.

    Subclasses implement ``load`` (strict: weights that do not fit are an error), ``scored`` (logits
    and labels per batch) and ``module``; evaluators that support AdaMerging also implement
    ``sample_unlabelled(task, count, generator)``, ``logits_with(task, inputs, params)`` (a
    functional forward with ``params`` replacing weights) and ``to(device)``.
    """

    tasks: list[str]

    @property
    def module(self) -> torch.nn.Module:
        raise NotImplementedError

    def load(self, state: Mapping[str, torch.Tensor], tag: str | None = None) -> None:
        raise NotImplementedError

    def scored(self, task: str, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(logits, labels) per batch of ``task``'s ``split`` with the weights loaded now."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(
        self,
        state: Mapping[str, torch.Tensor] | None,
        split: str,
        tasks: list[str] | None = None,
        tag: str | None = None,
    ) -> dict[str, dict[str, float]]:
        """Accuracy, loss and count per task of ``state`` (None: the weights already loaded)."""
        if state is not None:
            self.load(state, tag)
        self.module.eval()
        return {task: top1_and_loss(self.scored(task, split)) for task in tasks or self.tasks}
