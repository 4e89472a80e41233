"""Device and precision choices for merge arithmetic."""

from __future__ import annotations

import torch

from mergeflow.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name not in DEVICES:
        raise ConfigError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but torch sees no CUDA device")
    return torch.device(name)


def resolve_precision(name: str) -> torch.dtype:
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


OUT_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_out_dtype(name: str | None) -> torch.dtype | None:
    """The dtype every float tensor of the output is stored in; None keeps each key's θ0 dtype."""
    if name is None:
        return None
    if name not in OUT_DTYPES:
        raise ConfigError(f"unknown output dtype {name!r}; choose one of {', '.join(OUT_DTYPES)}")
    return OUT_DTYPES[name]
