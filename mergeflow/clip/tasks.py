"""The papers' zero-shot tasks as data (``mergeflow/data/clip_tasks.json``): class names in label order,
prompt templates, and where each dataset is read from by default.

A class is one name or a list of synonyms; a template holds ``{c}`` where the name goes. The head of a
task is a function of (text tower, class names, templates) only, so :func:`templates_hash` of those two
is part of the head's cache key.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib import resources
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mergeflow.errors import ConfigError
from mergeflow.presets import TASKS_8, TASKS_14, TASKS_20

TASK_SETS = {8: TASKS_8, 14: TASKS_14, 20: TASKS_20}


class TaskSpec(BaseModel):
    """One zero-shot task: ``classes[i]`` names label ``i``."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: str
    classes: tuple[str | tuple[str, ...], ...]
    templates: tuple[str, ...]
    loader: dict[str, Any] = Field(description="default dataset source (kind imagefolder | torchvision | hf)")
    folders: tuple[str, ...] | None = Field(None, description="ImageFolder class folders in label order")
    names_from: str = ""

    @field_validator("templates")
    @classmethod
    def _placeholder(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("no templates")
        for template in value:
            if "{c}" not in template:
                raise ValueError(f"template {template!r} has no {{c}}")
        return value

    def prompts(self, index: int) -> list[str]:
        """Every filled template of class ``index`` (all synonyms × all templates)."""
        names = self.classes[index]
        names = (names,) if isinstance(names, str) else names
        return [t.replace("{c}", name) for name in names for t in self.templates]


def templates_hash(classes: tuple[Any, ...] | list[Any], templates: tuple[str, ...] | list[str]) -> str:
    """sha256 of the class names and templates (what a zero-shot head is built from besides the model)."""
    payload = json.dumps({"classes": [list(c) if not isinstance(c, str) else c for c in classes],
                          "templates": list(templates)}, ensure_ascii=False)  # fmt: skip
    return hashlib.sha256(payload.encode()).hexdigest()


@cache
def _catalog() -> dict[str, Any]:
    text = resources.files("mergeflow").joinpath("data/clip_tasks.json").read_text(encoding="utf-8")
    return json.loads(text)["tasks"]


def known_tasks() -> list[str]:
    return list(_catalog())


def task_spec(name: str) -> TaskSpec:
    """The packaged spec of ``name`` (a task of the 8/14/20-task benchmarks)."""
    catalog = _catalog()
    if name not in catalog:
        raise ConfigError(f"unknown CLIP task {name!r}; known: {', '.join(catalog)}")
    raw = dict(catalog[name])
    raw["classes"] = tuple(c if isinstance(c, str) else tuple(c) for c in raw["classes"])
    return TaskSpec(name=name, **raw)
