"""mergeflow: training-free merging of fine-tuned checkpoints (CART and its baselines)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
