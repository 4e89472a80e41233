"""Tiny image models for the offline vision experiments: an open_clip ViT image tower (registered
with ``open_clip.add_model_config``, random init) and a small CNN, each a feature tower plus a
linear head. "Pretraining" here means supervised training on Fashion-MNIST: such a θ0 is **not a
foundation model** and transfers little; results on it say so.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mergeflow.zoo.vision_data import to_inputs

VIT_TINY = "mergeflow-vit-tiny"
VIT_TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 28, "patch_size": 4, "width": 96, "layers": 4, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
_registered = False


def register_vit_tiny() -> None:
    """Make ``mergeflow-vit-tiny`` known to ``open_clip.create_model`` (idempotent)."""
    global _registered
    if _registered:
        return
    import open_clip

    folder = Path(tempfile.mkdtemp(prefix="mergeflow-open-clip-"))
    (folder / f"{VIT_TINY}.json").write_text(json.dumps(VIT_TINY_CONFIG))
    open_clip.add_model_config(folder)
    _registered = True


class GrayToRGB(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1)


class SmallCNN(nn.Module):
    """conv(1→16) → pool → conv(16→32) → pool → fc(1568→64): 64-d penultimate features."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 7 * 7, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))


class Classifier(nn.Module):
    """``tower`` (features) then ``head`` (linear)."""

    def __init__(self, tower: nn.Module, dim: int, classes: int):
        super().__init__()
        self.tower, self.head = tower, nn.Linear(dim, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.tower(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


ARCHITECTURES = ("vit-tiny", "cnn")


def make_classifier(arch: str, classes: int, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    if arch == "vit-tiny":
        import open_clip

        register_vit_tiny()
        clip = open_clip.create_model(VIT_TINY, pretrained=None)
        return Classifier(nn.Sequential(GrayToRGB(), clip.visual), VIT_TINY_CONFIG["embed_dim"], classes)
    if arch == "cnn":
        return Classifier(SmallCNN(), 64, classes)
    raise ValueError(f"unknown architecture {arch!r}; known: {ARCHITECTURES}")


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: float = 1.0,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    parameters: Callable[[nn.Module], list[nn.Parameter]] | None = None,
) -> list[float]:
    """AdamW, linear warm-up over the first 10% of steps then cosine decay, over ``epochs`` passes of
    shuffled batches; returns the loss per step."""
    generator = torch.Generator().manual_seed(seed)
    chosen = parameters(model) if parameters else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(chosen, lr=lr, weight_decay=0.01)
    steps = max(1, math.ceil(epochs * len(images) / batch_size))
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    model.train()
    losses, order = [], torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(images), generator=generator)])
        batch, order = order[:batch_size], order[batch_size:]
        loss = F.cross_entropy(model(to_inputs(images[batch])), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()  # not inference_mode: features feed the probe's training
def predict(model: nn.Module, images: torch.Tensor, what: str = "logits", batch_size: int = 512) -> torch.Tensor:
    """Logits or penultimate features of ``images`` (uint8 N × 28 × 28), in eval mode."""
    model.eval()
    fn = model.features if what == "features" else model  # type: ignore[union-attr]
    return torch.cat([fn(to_inputs(images[i : i + batch_size])) for i in range(0, len(images), batch_size)])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def fit_linear_probe(
    features: torch.Tensor, labels: torch.Tensor, classes: int, steps: int = 300, l2: float = 1e-3
) -> nn.Linear:
    """Multinomial logistic regression on frozen features (L-BFGS, + l2·‖W‖²), deterministic. The L2
    keeps the head's scale moderate, so that fine-tuning the tower under it starts stably."""
    torch.manual_seed(0)
    head = nn.Linear(features.shape[1], classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head(features), labels) + l2 * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head
