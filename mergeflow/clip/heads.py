"""Zero-shot classification heads from an open_clip text tower (the CLIP protocol).

For class c with prompts p_1..p_m (every synonym × every template):
    e_c = normalise( mean_j normalise(text(p_j)) ),   head = exp(logit_scale) · [e_1; …; e_C]
and the logits of an image x are head · normalise(image(x)).

Heads are cached on disk by (model, revision, task, templates hash): ``revision`` is the sha256 of the
weights file the text tower was read from, so another checkpoint, class list or template set gives
another head and an unchanged one is never encoded twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from mergeflow.checkpoint import read_state_dict, stored_fingerprint
from mergeflow.clip.tasks import TaskSpec, templates_hash
from mergeflow.codeid import code_identity
from mergeflow.errors import CheckpointError
from mergeflow.writer import save_state_dict

log = logging.getLogger("mergeflow.clip")

TextEncoder = Callable[[list[str]], torch.Tensor]  # prompts -> embeddings [n, d]


@torch.no_grad()
def zeroshot_head(encode: TextEncoder, spec: TaskSpec, logit_scale: float) -> torch.Tensor:
    """[classes, d] float32: per class the renormalised mean of its normalised prompt embeddings, × scale."""
    rows = []
    for index in range(len(spec.classes)):
        embeddings = F.normalize(encode(spec.prompts(index)).float(), dim=-1)
        rows.append(F.normalize(embeddings.mean(0), dim=-1))
    return torch.stack(rows) * logit_scale


def head_key(model: str, revision: str, spec: TaskSpec) -> str:
    """Cache key of a head: what it is computed from (model, revision, task, templates) and the code computing it."""
    record = {"model": model, "revision": revision, "task": spec.name,
              "templates": templates_hash(spec.classes, spec.templates), "code": code_identity(__name__)}  # fmt: skip
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def cached_head(
    cache_dir: str | Path, model: str, revision: str, spec: TaskSpec, encoder: Callable[[], tuple[TextEncoder, float]]
) -> tuple[Path, bool]:
    """The head file of ``spec`` (built with ``encoder()`` only when the cache lacks it); returns (path, hit)."""
    key = head_key(model, revision, spec)
    path = Path(cache_dir) / f"{spec.name}-{key[:16]}.safetensors"
    if stored_fingerprint(path) == key:
        head = read_state_dict(path)["weight"]
        if head.shape[0] != len(spec.classes) or not torch.isfinite(head).all():
            raise CheckpointError(f"{path}: cached head does not fit {spec.name}; delete it to rebuild")
        return path, True
    encode, scale = encoder()
    head = zeroshot_head(encode, spec, scale)
    meta = {"mergeflow.fingerprint": key, "mergeflow.model": model, "mergeflow.revision": revision,
            "mergeflow.task": spec.name, "mergeflow.templates_sha256": templates_hash(spec.classes, spec.templates),
            "mergeflow.classes": json.dumps(list(spec.classes), ensure_ascii=False)}  # fmt: skip
    save_state_dict(path, {"weight": head.contiguous()}, meta)
    log.info("%s: zero-shot head %s built (%d classes, %d templates)", spec.name, path.name, len(spec.classes),
             len(spec.templates))  # fmt: skip
    return path, False


class OpenClipText:
    """The text tower of an open_clip model, weights read from a state-dict file (the full CLIP model)."""

    def __init__(self, model: str, weights: str | Path, device: str | torch.device = "cpu", batch_size: int = 256):
        import open_clip

        self.model = open_clip.create_model(model, pretrained=None)
        state = read_state_dict(weights)
        text_keys = [k for k in self.model.state_dict() if not k.startswith("visual.")]
        missing = [k for k in text_keys if k not in state and k != "attn_mask"]
        if missing:
            raise CheckpointError(f"{weights}: no text tower for {model} (missing {missing[:3]})")
        try:
            self.model.load_state_dict({k: v for k, v in state.items() if k in text_keys}, strict=False)
        except RuntimeError as exc:
            raise CheckpointError(f"{weights}: text tower does not fit {model} ({str(exc).splitlines()[-1]})") from None
        self.model.to(device).eval()
        self.device = torch.device(device)
        self.tokenizer = open_clip.get_tokenizer(model)
        self.batch_size = batch_size
        self.logit_scale = float(self.model.logit_scale.detach().exp())

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(prompts[start : start + self.batch_size]).to(self.device)
            out.append(self.model.encode_text(tokens).float().cpu())
        return torch.cat(out)
