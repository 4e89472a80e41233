"""Model zoos built from what ships in packages: real pretrained weights, real task data."""

from pathlib import Path
from typing import Any

ZOOS = ("text-minilm", "vision-tiny", "clip")


def build_zoo(name: str, directory: str | Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Build (or resume) the zoo ``name`` in ``directory`` with its settings from params.yaml."""
    if name == "clip":
        from mergeflow.clip.zoo import ClipZooConfig, build_clip_zoo

        return build_clip_zoo(directory, ClipZooConfig(**settings))
    if name == "vision-tiny":
        from mergeflow.zoo.vision_zoo import VisionZooConfig, build_vision_zoo

        return build_vision_zoo(directory, VisionZooConfig(**settings))
    from mergeflow.zoo.build import TextZooConfig, build_text_zoo

    return build_text_zoo(directory, TextZooConfig(**settings))


def zoo_sources(name: str, settings: dict[str, Any]) -> dict[str, str]:
    """sha256 of every packaged file the zoo's data is read from (part of its cache key); for ``clip``
    the content digest of each task's train and test data (file hashes cached by stat)."""
    if name == "clip":
        from mergeflow.clip.zoo import ClipZooConfig, data_digests

        return data_digests(ClipZooConfig(**settings))
    if name == "vision-tiny":
        from mergeflow.hashing import sha256_files_cached
        from mergeflow.zoo.vision_data import source_files

        return sha256_files_cached(source_files(settings["tasks"]))
    from mergeflow.zoo.text_data import source_hashes

    return source_hashes(settings["tasks"])
