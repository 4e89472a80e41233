"""Presets for the papers' settings: CLIP image encoders and their task fine-tunes.

Checkpoints default to the TALL-masks re-release of the task-vectors fine-tunes on the Hugging Face
Hub (``nik-dim/tall_masks``: ``single_task/<model>/<Task>Val/nonlinear_finetuned.pt``, θ0 =
``single_task/<model>/MNISTVal/nonlinear_zeroshot.pt``), whose state dicts hold the image encoder
under ``model.visual.``. ``clip-vit-b32-8tasks-hf`` takes FusionBench's HF-transformers re-trains
instead, converted to the open_clip layout (q/k/v fused). Neither the Hub commits nor the files'
sha256 could be read from this offline machine: both are pinned on first acquisition (store
``lock.json``) and enforced afterwards; set ``revision``/``sha256`` to pin them up front.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from mergeflow.errors import ConfigError
from mergeflow.sources import HubSource, Source

TASKS_8 = ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"]
TASKS_14 = [*TASKS_8, "CIFAR100", "STL10", "Flowers102", "OxfordIIITPet", "PCAM", "FER2013"]
TASKS_20 = [*TASKS_14, "EMNIST", "CIFAR10", "Food101", "FashionMNIST", "RenderedSST2", "KMNIST"]

# mean absolute top-1 (%) reported by the CART paper (task-vectors checkpoints); see docs/presets.md
PUBLISHED = {
    ("ViT-B-32", 8): {
        "zero-shot": 48.0, "individual": 90.5, "weight_average": 65.9, "task_arithmetic": 69.1, "ties": 72.4,
        "consensus": 75.2, "cart": 84.7, "adamerging": 80.1, "adamerging+cart": 85.8,
    },
    ("ViT-B-32", 14): {"cart": 79.5},
    ("ViT-B-32", 20): {"cart": 76.3},
    ("ViT-L-14", 8): {"cart": 92.6},
}  # fmt: skip
# CART settings the paper reports for ViT-B/32; ViT-L/14's are not given there (choose on validation)
CART_SETTINGS = {
    ("ViT-B-32", 8): {"scaling": 2.0, "rank_ratio": 0.12},
    ("ViT-B-32", 14): {"scaling": 1.5, "rank_ratio": 0.16},
    ("ViT-B-32", 20): {"scaling": 1.9, "rank_ratio": 0.32},
}
TALL_MASKS = "nik-dim/tall_masks"
FUSIONBENCH_HF = {
    "SUN397": "sun397", "Cars": "stanford-cars", "RESISC45": "resisc45", "EuroSAT": "eurosat",
    "SVHN": "svhn", "GTSRB": "gtsrb", "MNIST": "mnist", "DTD": "dtd",
}  # fmt: skip


class Preset(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: str
    description: str
    model: str  # open_clip architecture
    checkpoint_set: str  # part of every experiment's identity: numbers differ between sets
    pretrained: Source
    finetuned: list[Source]
    tasks: list[str]
    templates: str  # prompt-template set used for zero-shot heads
    methods: dict[str, dict[str, Any]]
    published: dict[str, float]


def _tall(model: str, tasks: list[str]) -> tuple[Source, list[Source]]:
    def source(name: str, path: str) -> HubSource:
        return HubSource(
            name=name, repo=TALL_MASKS, filename=f"single_task/{model}/{path}", select_prefix="model.visual."
        )

    pretrained = source("zeroshot", "MNISTVal/nonlinear_zeroshot.pt")
    return pretrained, [source(task, f"{task}Val/nonlinear_finetuned.pt") for task in tasks]


def _paper_preset(name: str, model: str, tasks: list[str]) -> Preset:
    pretrained, finetuned = _tall(model, tasks)
    cart = CART_SETTINGS.get((model, len(tasks)), {"scaling": 2.0, "rank_ratio": 0.12})
    return Preset(
        name=name,
        description=f"CLIP {model} image encoder, {len(tasks)} tasks, TALL-masks re-release of task-vector fine-tunes",
        model=model,
        checkpoint_set="tall_masks",
        pretrained=pretrained,
        finetuned=finetuned,
        tasks=tasks,
        templates="task_vectors",
        methods={
            "weight_average": {},
            "task_arithmetic": {"scaling": 0.3},
            "ties": {"density": 0.2, "merge": "sum", "scaling": 1.0},
            "consensus": {"mask_lambda": 0.4, "min_tasks": 2, "scaling": 1.0},
            "cart": {**cart, "selector": "attn_mlp"},
            "tsv": {"scaling": 1.0},
            "iso_c": {"scaling": 1.5},
            "iso_cts": {"scaling": 1.5, "common_fraction": 0.8},
        },
        published=PUBLISHED.get((model, len(tasks)), {}),
    )


def _hf_preset() -> Preset:
    pretrained = HubSource(
        name="zeroshot", repo="openai/clip-vit-base-patch32", filename="model.safetensors",
        convert="hf_clip_vision", exclude_keys=("proj",),
    )  # fmt: skip
    finetuned = [
        HubSource(
            name=task,
            repo=f"tanganke/clip-vit-base-patch32_{slug}",
            filename="model.safetensors",
            convert="hf_clip_vision",
        )
        for task, slug in FUSIONBENCH_HF.items()
    ]
    base = _paper_preset("clip-vit-b32-8tasks-hf", "ViT-B-32", TASKS_8)
    return base.model_copy(
        update={
            "description": "CLIP ViT-B-32 image encoder, 8 tasks, FusionBench's HF-transformers fine-tunes (converted)",
            "checkpoint_set": "fusionbench_hf",
            "pretrained": pretrained,
            "finetuned": finetuned,
            "published": {},
        }
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _paper_preset("clip-vit-b32-8tasks", "ViT-B-32", TASKS_8),
        _paper_preset("clip-vit-b32-14tasks", "ViT-B-32", TASKS_14),
        _paper_preset("clip-vit-b32-20tasks", "ViT-B-32", TASKS_20),
        _paper_preset("clip-vit-l14-8tasks", "ViT-L-14", TASKS_8),
        _hf_preset(),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
