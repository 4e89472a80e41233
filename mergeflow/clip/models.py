"""open_clip models: the project's own configs and the image preprocessing split for caching."""

from __future__ import annotations

from functools import cache
from importlib import resources

import torch
from torchvision.transforms.functional import pil_to_tensor

CLIP_TINY = "mergeflow-clip-tiny"  # random-init CLIP with a text tower, for tests of the CLIP path


@cache
def register_configs() -> None:
    """Make the configs in ``mergeflow/data/open_clip`` known to ``open_clip.create_model`` (idempotent)."""
    import open_clip

    with resources.as_file(resources.files("mergeflow").joinpath("data/open_clip")) as folder:
        open_clip.add_model_config(folder)


def create_model(name: str) -> torch.nn.Module:
    """``open_clip.create_model(name)`` without weights (they are loaded from acquired files)."""
    import open_clip

    register_configs()
    return open_clip.create_model(name, pretrained=None)


class Preprocess:
    """open_clip's evaluation transform in two halves: ``geometry`` (resize, crop, RGB) -> uint8 tensor,
    cacheable; ``normalise`` (/255, mean/std) on a batch. Their composition equals the full transform."""

    def __init__(self, visual: torch.nn.Module):
        from open_clip.transform import PreprocessCfg, image_transform_v2

        cfg = PreprocessCfg(**visual.preprocess_cfg)  # type: ignore[arg-type]
        steps = image_transform_v2(cfg, is_train=False).transforms
        cut = next(i for i, s in enumerate(steps) if "ToTensor" in type(s).__name__)
        self.steps = steps[:cut]
        self.mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.std).view(1, 3, 1, 1)

    def geometry(self, image: object) -> torch.Tensor:
        for step in self.steps:
            image = step(image)
        return pil_to_tensor(image)  # type: ignore[arg-type]

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.float().div(255)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)
