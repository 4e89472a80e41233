"""Synthetic checkpoints with the exact key layouts of real models, for demos, tests and benchmarks.

θ0 is random; each fine-tune is θ0 + τt with, per tensor,
τt = shared low-rank part + task-specific low-rank part (decaying spectrum) + small dense noise,
scaled so that ‖τt‖ ≈ ``relative_size`` · ‖θ0‖. These are not trained models: they exercise the
merge math, the I/O and the costs at real shapes, nothing about accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mergeflow.checkpoint import TensorMeta
from mergeflow.writer import SafetensorsWriter


def open_clip_visual_layout(
    width: int, layers: int, patch: int, image: int, output_dim: int, mlp_ratio: float = 4.0, prefix: str = ""
) -> dict[str, TensorMeta]:
    """Keys and shapes of an open_clip ``VisionTransformer`` state dict (fused q/k/v ``in_proj``)."""
    f32 = torch.float32
    grid = image // patch
    hidden = int(width * mlp_ratio)
    out: dict[str, TensorMeta] = {
        "class_embedding": TensorMeta((width,), f32),
        "positional_embedding": TensorMeta((grid * grid + 1, width), f32),
        "proj": TensorMeta((width, output_dim), f32),
        "conv1.weight": TensorMeta((width, 3, patch, patch), f32),
        "ln_pre.weight": TensorMeta((width,), f32),
        "ln_pre.bias": TensorMeta((width,), f32),
        "ln_post.weight": TensorMeta((width,), f32),
        "ln_post.bias": TensorMeta((width,), f32),
    }
    for i in range(layers):
        block = f"transformer.resblocks.{i}."
        out.update(
            {
                block + "ln_1.weight": TensorMeta((width,), f32),
                block + "ln_1.bias": TensorMeta((width,), f32),
                block + "attn.in_proj_weight": TensorMeta((3 * width, width), f32),
                block + "attn.in_proj_bias": TensorMeta((3 * width,), f32),
                block + "attn.out_proj.weight": TensorMeta((width, width), f32),
                block + "attn.out_proj.bias": TensorMeta((width,), f32),
                block + "ln_2.weight": TensorMeta((width,), f32),
                block + "ln_2.bias": TensorMeta((width,), f32),
                block + "mlp.c_fc.weight": TensorMeta((hidden, width), f32),
                block + "mlp.c_fc.bias": TensorMeta((hidden,), f32),
                block + "mlp.c_proj.weight": TensorMeta((width, hidden), f32),
                block + "mlp.c_proj.bias": TensorMeta((width,), f32),
            }
        )
    return {prefix + k: v for k, v in out.items()}


def bert_layout(
    hidden: int, layers: int, intermediate: int, vocab: int = 1000, positions: int = 64
) -> dict[str, TensorMeta]:
    """Keys and shapes of an HF ``BertModel`` state dict (split q/k/v, int64 ``position_ids``)."""
    f32 = torch.float32
    out: dict[str, TensorMeta] = {
        "embeddings.word_embeddings.weight": TensorMeta((vocab, hidden), f32),
        "embeddings.position_embeddings.weight": TensorMeta((positions, hidden), f32),
        "embeddings.token_type_embeddings.weight": TensorMeta((2, hidden), f32),
        "embeddings.LayerNorm.weight": TensorMeta((hidden,), f32),
        "embeddings.LayerNorm.bias": TensorMeta((hidden,), f32),
        "embeddings.position_ids": TensorMeta((1, positions), torch.int64),
        "pooler.dense.weight": TensorMeta((hidden, hidden), f32),
        "pooler.dense.bias": TensorMeta((hidden,), f32),
    }
    for i in range(layers):
        block = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            out[block + f"attention.self.{name}.weight"] = TensorMeta((hidden, hidden), f32)
            out[block + f"attention.self.{name}.bias"] = TensorMeta((hidden,), f32)
        out.update(
            {
                block + "attention.output.dense.weight": TensorMeta((hidden, hidden), f32),
                block + "attention.output.dense.bias": TensorMeta((hidden,), f32),
                block + "attention.output.LayerNorm.weight": TensorMeta((hidden,), f32),
                block + "attention.output.LayerNorm.bias": TensorMeta((hidden,), f32),
                block + "intermediate.dense.weight": TensorMeta((intermediate, hidden), f32),
                block + "intermediate.dense.bias": TensorMeta((intermediate,), f32),
                block + "output.dense.weight": TensorMeta((hidden, intermediate), f32),
                block + "output.dense.bias": TensorMeta((hidden,), f32),
                block + "output.LayerNorm.weight": TensorMeta((hidden,), f32),
                block + "output.LayerNorm.bias": TensorMeta((hidden,), f32),
            }
        )
    return out


MODELS = {
    "vit-tiny": lambda: open_clip_visual_layout(width=64, layers=2, patch=8, image=32, output_dim=32),
    "vit-b-32": lambda: open_clip_visual_layout(width=768, layers=12, patch=32, image=224, output_dim=512),
    "bert-tiny": lambda: bert_layout(hidden=64, layers=2, intermediate=256),
}


def pretrained_tensor(meta: TensorMeta, generator: torch.Generator) -> torch.Tensor:
    if not meta.is_float:
        return torch.arange(meta.numel, dtype=meta.dtype).reshape(meta.shape)
    fan_in = meta.shape[-1] if len(meta.shape) >= 2 else 1
    return torch.randn(meta.shape, generator=generator) / fan_in**0.5


def _low_rank(m: int, n: int, rank: int, decay: float, generator: torch.Generator) -> torch.Tensor:
    u = torch.randn(m, rank, generator=generator) / m**0.5
    v = torch.randn(rank, n, generator=generator) / n**0.5
    spectrum = torch.exp(-torch.arange(rank, dtype=torch.float32) / decay)
    return (u * spectrum) @ v


def task_vector(
    meta: TensorMeta, base_norm: float, relative_size: float, shared: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Shared part + task-specific decaying-spectrum low-rank part + dense noise, at ‖τ‖ ≈ size·‖θ0‖."""
    if len(meta.shape) == 2:
        m, n = meta.shape
        rank = max(1, min(m, n) // 4)
        own = _low_rank(m, n, rank, decay=rank / 6, generator=generator)
        own = own / own.norm()
        noise = torch.randn(meta.shape, generator=generator)
        direction = 0.5 * shared + 0.8 * own + 0.1 * noise / noise.norm()
    else:
        noise = torch.randn(meta.shape, generator=generator)
        direction = 0.5 * shared + noise / noise.norm()
    return direction * (relative_size * base_norm / direction.norm())


@dataclass(frozen=True)
class ExamplePaths:
    pretrained: Path
    finetuned: list[Path]


def write_example_checkpoints(
    directory: str | Path, model: str = "vit-tiny", tasks: int = 4, seed: int = 0, relative_size: float = 0.02
) -> ExamplePaths:
    """Write θ0 and ``tasks`` synthetic fine-tunes as safetensors, one tensor in memory per file at a time."""
    if model not in MODELS:
        raise ValueError(f"unknown example model {model!r}; known: {', '.join(MODELS)}")
    layout = MODELS[model]()
    directory = Path(directory)
    pretrained = directory / "pretrained.safetensors"
    finetuned = [directory / f"task{t:02d}.safetensors" for t in range(tasks)]
    writers = [
        SafetensorsWriter(p, layout, {"mergeflow.synthetic": f"{model} seed={seed}"}) for p in (pretrained, *finetuned)
    ]
    generator = torch.Generator().manual_seed(seed)
    try:
        for key, meta in layout.items():
            base = pretrained_tensor(meta, generator)
            writers[0].write(key, base)
            if not meta.is_float:
                for writer in writers[1:]:
                    writer.write(key, base)
                continue
            shared_raw = (
                _low_rank(*meta.shape, max(1, min(meta.shape) // 8), 4.0, generator)
                if len(meta.shape) == 2
                else torch.randn(meta.shape, generator=generator)
            )
            shared = shared_raw / shared_raw.norm()
            base_norm = float(base.norm()) or 1.0
            for writer in writers[1:]:
                writer.write(key, base + task_vector(meta, base_norm, relative_size, shared, generator))
        for writer in writers:
            writer.commit()
    finally:
        for writer in writers:
            writer.abort()
    return ExamplePaths(pretrained, finetuned)
