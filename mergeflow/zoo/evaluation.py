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


def split_part(split: str) -> tuple[str, int, int]:
    """A split name and the part of it asked for: ``"validation"`` is the whole split, ``(name, 0, 1)``;
    ``"validation:2/4"`` is fold 2 of 4, the examples whose index i has i mod 4 = 2, ``(name, 2, 4)``.
    The folds of a split are disjoint and together are the split (on data in class order, each is
    stratified); successive halving scores grid points on growing unions of them."""
    name, _, part = split.partition(":")
    if not part:
        return name, 0, 1
    try:
        fold, folds = (int(x) for x in part.split("/"))
    except ValueError:
        raise ValueError(f"split {split!r}: a part is written name:fold/folds, e.g. validation:0/4") from None
    if not 0 <= fold < folds:
        raise ValueError(f"split {split!r}: fold {fold} is not in 0..{folds - 1}")
    return name, fold, folds


def part_of(split: str, fold: int, folds: int) -> str:
    """The name :func:`split_part` reads back: ``split`` itself for the whole split."""
    return split if folds == 1 else f"{split}:{fold}/{folds}"


def combine_parts(parts: Iterable[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """Per-task scores of disjoint parts of a split joined as one evaluation: accuracy Σ correct / Σ n,
    loss Σ (loss · n) / Σ n (the union's mean), n Σ n; all parts of a split give its whole-split scores."""
    correct: dict[str, int] = {}
    loss: dict[str, float] = {}
    count: dict[str, int] = {}
    for part in parts:
        for task, s in part.items():
            n = int(s["n"])
            correct[task] = correct.get(task, 0) + round(s["accuracy"] * n)
            loss[task] = loss.get(task, 0.0) + s["loss"] * n
            count[task] = count.get(task, 0) + n
    return {t: {"accuracy": correct[t] / max(count[t], 1), "loss": loss[t] / max(count[t], 1), "n": count[t]}
            for t in count}  # fmt: skip


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
        """(logits, labels) per batch of ``task``'s ``split`` (a whole split or a fold of it, see
        :func:`split_part`) with the weights loaded now."""
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
