"""Fast repeated evaluation on a built text zoo: one MiniLM, the heads, and every split tokenised once.

Batches are formed from examples sorted by token length (85 % of the positions computed are real
tokens on the validation splits), so evaluating a model costs forward passes only. AdaMerging's
random batches are packed without padding instead (:meth:`TextEvaluator.logits_many`). Accuracy
is top-1 of ``head · embedding``; loss is mean cross-entropy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from mergeflow.artefacts import load_strict
from mergeflow.checkpoint import read_state_dict
from mergeflow.zoo.description import read_zoo
from mergeflow.zoo.evaluation import Batch, Evaluator, split_part
from mergeflow.zoo.packing import mean_pool, pack
from mergeflow.zoo.text_model import encoder_weights, load_text_encoder
from mergeflow.zoo.text_zoo import TextZooConfig


class TextEvaluator(Evaluator):
    """Evaluates state dicts of θ0's architecture on every task of a text zoo."""

    def __init__(self, zoo_dir: str | Path, batch_size: int = 64):
        self.zoo_dir = Path(zoo_dir)
        self.zoo = read_zoo(self.zoo_dir)
        cfg = TextZooConfig(**self.zoo["config"])
        self.encoder = load_text_encoder(layers=cfg.layers, max_length=cfg.max_length)
        self.tasks: list[str] = list(self.zoo["tasks"])
        self.heads = {t: read_state_dict(info["head"])["weight"] for t, info in self.zoo["tasks"].items()}
        self.batch_size = batch_size
        self._batches: dict[tuple[str, str], list[Batch]] = {}
        self._loaded: str | None = None

    def texts(self, task: str, split: str) -> tuple[list[str], list[int]]:
        """Texts and labels of a split, or of one fold of it (``validation:0/4``, see :func:`split_part`)."""
        name, fold, folds = split_part(split)
        data = json.loads(Path(self.zoo["tasks"][task]["data"]).read_text())["splits"][name]
        return data["texts"][fold::folds], data["labels"][fold::folds]

    def batches(self, task: str, split: str) -> list[Batch]:
        """Length-sorted, padded batches of one task's split (built once). A fold of f folds
        (:func:`split_part`) gets batches of ``batch_size // f`` texts: its sorted lengths are f times
        sparser, so a batch of that size spans the same range of lengths, and pads as little, as a
        batch of the whole split (on the text zoo's validation folds 8 051 positions for 6 901 real
        tokens instead of 11 651: a fold costs 0.27 of the whole split instead of 0.36)."""
        if (task, split) not in self._batches:
            texts, labels = self.texts(task, split)
            size = max(1, self.batch_size // split_part(split)[2])
            tokenizer = self.encoder.tokenizer
            tokens = tokenizer(texts, truncation=True, max_length=self.encoder.max_length)  # type: ignore[operator]
            order = sorted(range(len(texts)), key=lambda i: (len(tokens["input_ids"][i]), i))
            batches = []
            for start in range(0, len(order), size):
                chosen = order[start : start + size]
                features = {name: [tokens[name][i] for i in chosen] for name in tokens}
                padded = tokenizer.pad(features, return_tensors="pt")  # type: ignore[attr-defined]
                batches.append((dict(padded), torch.tensor([labels[i] for i in chosen])))
            self._batches[(task, split)] = batches
        return self._batches[(task, split)]

    def load(self, state: Mapping[str, torch.Tensor], tag: str | None = None) -> None:
        """Put ``state`` into the encoder (skipped when ``tag`` names the state already loaded)."""
        if tag is not None and tag == self._loaded:
            return
        load_strict(self.encoder.model, encoder_weights(state), "the encoder", may_lack=("position_ids",))
        self._loaded = tag

    def embed(self, inputs: dict[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Normalised mean-pooled embeddings; ``params`` replaces weights functionally (differentiable)."""
        hidden = self._hidden(inputs, params)
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)

    @property
    def module(self) -> torch.nn.Module:
        return self.encoder.model

    def sample_unlabelled(self, task: str, count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``count`` random test texts of ``task``, tokenised (labels are not read)."""
        texts = self.texts(task, "test")[0]
        chosen = torch.randint(len(texts), (count,), generator=generator).tolist()
        return dict(self.encoder.tokenize([texts[i] for i in chosen]))

    def logits_with(
        self, task: str, inputs: dict[str, torch.Tensor], params: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        head = self.heads[task]
        return self.embed({k: v.to(head.device) for k, v in inputs.items()}, params=params) @ head.T

    def embed_packed(
        self, sequences: Sequence[Mapping[str, torch.Tensor]], params: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """:meth:`embed` of unpadded sequences (1-D ``input_ids``/``token_type_ids`` each), packed into rows
        of ``max_length`` positions (:mod:`mergeflow.zoo.packing`): the same embeddings to float round-off,
        without computing padding."""
        pad_id = int(self.encoder.tokenizer.pad_token_id or 0)  # type: ignore[attr-defined]
        packed = pack(sequences, max(self.encoder.max_length, max(len(q["input_ids"]) for q in sequences)), pad_id)
        device = next(iter(self.heads.values())).device
        hidden = self._hidden({k: v.to(device) for k, v in packed.inputs.items()}, params)
        return F.normalize(mean_pool(hidden, packed), dim=-1)

    def _hidden(self, inputs: dict[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        """The encoder's last hidden states; ``params`` replaces weights functionally (differentiable)."""
        model = self.encoder.model
        if params is None:
            return model(**inputs).last_hidden_state
        return torch.func.functional_call(model, dict(params), args=(), kwargs=inputs, strict=False).last_hidden_state

    def logits_many(
        self, batches: Sequence[tuple[str, dict[str, torch.Tensor]]], params: Mapping[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        """``logits_with`` of several tasks' batches under the same weights, in one padding-free forward.

        Every batch's sequences are unpadded and packed together (:meth:`embed_packed`); each task's
        logits are what ``logits_with`` gives, to float round-off. On the text zoo's random test
        batches of 16 the forward computes ~1 500 token positions a step instead of ~2 600.
        """
        if not batches:
            return []
        sequences, owners = [], []
        for b, (_, inputs) in enumerate(batches):
            for i, n in enumerate(inputs["attention_mask"].sum(1).tolist()):
                sequences.append({k: v[i, : int(n)] for k, v in inputs.items() if k in ("input_ids", "token_type_ids")})
                owners.append(b)
        embedded = self.embed_packed(sequences, params)
        owner = torch.tensor(owners)
        return [embedded[owner == b] @ self.heads[task].T for b, (task, _) in enumerate(batches)]

    def to(self, device: torch.device) -> TextEvaluator:
        """Move the encoder and heads (adaptation on a GPU); evaluation keeps to the CPU copy."""
        self.encoder.model.to(device)
        self.heads = {t: h.to(device) for t, h in self.heads.items()}
        return self

    def scored(self, task: str, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for inputs, labels in self.batches(task, split):
            yield self.embed(inputs) @ self.heads[task].T, labels
